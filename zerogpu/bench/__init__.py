"""`zerogpu bench`: the whole pipeline on this machine, against the obvious alternatives.

One run builds a model of the size asked for (square float32 linear layers,
each followed by tanh, seeded), writes it to two files in a temporary folder,
and measures in this order:

1. zerogpu through its real entry points: `zerogpu.enable()`, the model moved
   to 'cuda', `zerogpu.startup()` (the pack), and a `@zerogpu.GPU` function
   that runs the model on a small batch. Cold calls fork a worker that
   attaches the device, restores the weights, runs and returns; warm calls
   reuse a worker kept idle (ZEROGPU_IDLE_TIMEOUT). Each timed call is driven
   as the decorator drives it, through `call.Call`, so its phases can be read.
2. The copy engine's strategies, each restoring the same weights from a
   snapshot into one device buffer (`engine.Engine`).
3. The same work done without zerogpu, in this process: the function with the
   model already on the device; the model moved there per call from ordinary
   memory (`model.to(device)`); loaded per call with
   `safetensors.torch.load_file`; and read per call from a file on disk
   through two buffers, as the disk-backed loader of ZeroGPU's `spaces`
   package does (`BufferedFileLoader`).

zerogpu is measured first because the alternatives open a CUDA context in
this process, after which it must not fork workers (on the emulated backend
the order is kept the same). The pipeline runs on the GPU when one is visible
and on the emulated backend otherwise; there the "device" is host memory, so
moving or loading the model onto it is a copy into fresh memory: the work a
GPU copy does, less the bus. Every output is checked against zerogpu's.

Sizes are binary (1GB = 1GiB = 2**30 bytes), as in benchmarks/*.py;
throughput is in GB/s of 10**9 bytes per second.
"""

from __future__ import annotations

from .arguments import DEFAULT_REPEAT, DEFAULT_SIZE

__all__ = ["ALTERNATIVES", "DEFAULT_REPEAT", "DEFAULT_SIZE", "Plan", "build_model", "interrupt_once", "parse_repeat",
           "parse_size", "passed", "plan", "render", "run", "verdicts", "warnings"]

# What needs torch is imported at first use, so that the command line answers at once.
_LAZY = {"ALTERNATIVES": ".alternatives", "Plan": ".arguments", "parse_repeat": ".arguments",
         "parse_size": ".arguments", "plan": ".arguments", "build_model": ".model", "interrupt_once": ".suite",
         "run": ".suite", "machine": ".report", "package_version": ".report", "passed": ".report",
         "render": ".report", "verdicts": ".report", "warnings": ".report"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'zerogpu.bench' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
