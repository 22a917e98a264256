"""torch.compile on the emulated device, and the compile cache every worker of an app shares.

torch.compile would trace the emulation's function mode along with the
model and break its graph at every op. A compiled callable therefore runs
with the mode suspended in its thread, where emulated tensors are the CPU
tensors they are, and its outputs are marked for the device of its inputs
(or of the compiled module's weights) afterwards.

Each worker is a fresh process, so the compile of one would be lost with it;
inductor's caches (FX graphs, AOTAutograd, kernels) are kept in a folder of
the app's under zerogpu's data folder, which every later worker starts from,
and which outlives restarts. patch() chooses it, before torch's compilers are
imported (they fix their folder then). TORCHINDUCTOR_CACHE_DIR, when set, is
left alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from .. import settings
from . import emulated_devices, torch_mode
from .registry import marked

_thread = threading.local()


def in_compiled_code() -> bool:
    """Whether this thread runs a torch.compile'd callable on the emulated device."""
    return getattr(_thread, "compiled", False)


def _index_of(args: tuple, kwargs: dict, source: object) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            index = marked.index(leaf)
            if index is not None:
                return index
    module = source if isinstance(source, torch.nn.Module) else getattr(source, "__self__", None)
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return marked.index(tensor)
    return None


def _emulated_call(compiled: Callable, source: object) -> Callable:
    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        if emulated_devices.patched is None or emulated_devices.is_suspended():
            return compiled(*args, **kwargs)
        index = _index_of(args, kwargs, source)
        was = in_compiled_code()
        _thread.compiled = True
        try:
            with torch_mode.suspended():
                result = compiled(*args, **kwargs)
        finally:
            _thread.compiled = was
        if index is not None:
            for leaf in pytree.tree_leaves(result):
                if isinstance(leaf, torch.Tensor):
                    marked.set(leaf, index)
        return result

    return call


def compile_emulated(original: Callable) -> Callable:
    """torch.compile, whose compiled callables run as described above."""

    @functools.wraps(original)
    def compile(model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            return lambda model: compile(model, **kwargs)
        compiled = original(model, **kwargs)
        if isinstance(compiled, torch.nn.Module):  # an OptimizedModule: its forward runs the compiled code
            compiled.forward = _emulated_call(compiled.forward, model)
            return compiled
        return _emulated_call(compiled, model)

    return compile


def app_cache_dir() -> Path:
    """The app's compile cache: one folder per main script, under zerogpu's data folder."""
    main = sys.modules.get("__main__")
    name = os.path.abspath(getattr(main, "__file__", None) or sys.argv[0] or "interactive")
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return settings.data_dir() / "compile-cache" / f"{Path(name).stem}-{digest}"


def use_app_cache() -> None:
    """Point inductor's caches at the app's folder (owner only), unless the environment names one."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    folder = app_cache_dir()
    folder.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for part in (folder.parent, folder):
        part.mkdir(exist_ok=True, mode=0o700)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
