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

import datetime
import gc
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..units import describe_size
from .alternatives import ALTERNATIVES, measure_alternatives
from .arguments import DEFAULT_REPEAT, DEFAULT_SIZE, Plan, parse_repeat, parse_size, plan
from .buffered_loader import BufferedFileLoader
from .model import BATCH, SEED, build_model, skeleton
from .pipeline import measure_strategies, measure_zerogpu
from .report import machine, package_version, passed, render

__all__ = ["ALTERNATIVES", "DEFAULT_REPEAT", "DEFAULT_SIZE", "Plan", "build_model", "interrupt_once", "parse_repeat",
           "parse_size", "passed", "plan", "render", "run"]


@contextmanager
def interrupt_once() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; later ones are ignored so that the cleanup can finish."""
    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Measure everything `plan` says; returns the report (see `render` and the JSON file).

    Leaves nothing behind on any path, Ctrl-C included: no worker, no
    shared-memory segment, no file.
    """
    workdir = Path(tempfile.mkdtemp(prefix="zerogpu-bench-", dir=plan.workdir))
    try:
        say(f"building a {describe_size(plan.nbytes)} model: {plan.layers} layers of {plan.width} x {plan.width} float32")
        model = build_model(plan.layers, plan.width)
        shape = skeleton(plan.layers, plan.width)
        x = torch.randn(BATCH, plan.width, generator=torch.Generator().manual_seed(SEED + 1))
        say(f"writing the weights to {workdir} for the file-based loaders")
        weights_file = workdir / "model.safetensors"
        save_file(model.state_dict(), weights_file)
        loader = BufferedFileLoader(workdir / "model.bin", model.state_dict(), plan.backend)

        reference, measured = measure_zerogpu(plan, model, x, workdir / "quota.sqlite", say)
        del model
        gc.collect()  # the snapshot's memory goes with the last tensor that viewed it
        strategies = measure_strategies(plan, weights_file, shape, x, reference, say)
        alternatives = measure_alternatives(plan, weights_file, loader, shape, x, reference, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    cold, warm = measured["cold_call"]["median"], measured["warm_call"]["median"]
    for result in alternatives.values():
        result["ratio_to_cold"] = result["median"] / cold
        result["ratio_to_warm"] = result["median"] / warm
    return {
        "zerogpu": package_version("zerogpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": plan.backend,
        "device": plan.device_name,
        "machine": machine(),
        "model": {"bytes": plan.nbytes, "layers": plan.layers, "width": plan.width, "dtype": "float32",
                  "tensors": 2 * plan.layers, "batch": BATCH},
        "repeat": plan.repeat,
        **measured,
        "restore_strategies": strategies,
        "alternatives": alternatives,
    }
