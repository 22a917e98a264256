"""`zerogpu bench`'s run: every measurement in turn, and the report they make."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
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
from .arguments import Plan
from .buffered_loader import BufferedFileLoader
from .model import BATCH, SEED, build_model, skeleton
from .pipeline import measure_strategies, measure_zerogpu
from .rivals import RIVALS, ForkPerCall, LoadedPool
from .report import machine, package_version, passed, render

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

        load_before = os.getloadavg()
        say("alternatives: starting a fork-per-call server and a process pool with the model loaded")
        with contextlib.ExitStack() as started:
            rivals = {}
            for name, kind in (("fork_to_device", ForkPerCall), ("loaded_pool", LoadedPool)):
                rival = kind(weights_file, plan.layers, plan.width, plan.backend)
                started.callback(rival.close)
                rivals[name] = rival
            reference, measured, rounds = measure_zerogpu(plan, model, x, workdir / "quota.sqlite", say,
                                                          rivals=rivals, labels=RIVALS)
        del model
        gc.collect()  # the snapshot's memory goes with the last tensor that viewed it
        strategies = measure_strategies(plan, weights_file, shape, x, reference, say)
        alternatives = {**rounds, **measure_alternatives(plan, weights_file, loader, shape, x, reference, say)}
        load_after = os.getloadavg()
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
        "load_average": {"before": list(load_before), "after": list(load_after)},
        **measured,
        "restore_strategies": strategies,
        "alternatives": alternatives,
    }
