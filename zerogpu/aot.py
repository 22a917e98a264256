"""`zerogpu.aot`: ahead-of-time compilation of a module in a worker (see zerogpu.call.aot)."""

from .call.aot import Compiled, apply, capture, compile, compile_exported, load, load_blocks, read, save

__all__ = ["Compiled", "capture", "compile", "compile_exported", "apply", "save", "read", "load", "load_blocks"]
