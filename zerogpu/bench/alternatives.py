"""The same calls without zerogpu, in this process: the model in place, moved to the device per
call, loaded per call with safetensors, and read per call through `spaces`' double buffer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .arguments import Plan
from .buffered_loader import BUFFER_BYTES, BUFFER_COUNT, BufferedFileLoader
from .model import Stack, compare, median_of, run_with, worst
from .rivals import RIVALS

# The process-based ones (zerogpu.bench.rivals) are timed in turn with zerogpu's calls;
# the in-process ones open a CUDA context in the bench's process, so they come after.
IN_PROCESS = {
    "in_process": "in-process, model in place",
    "to_device": "model.to(device) per call",
    "load_file": "load_file per call",
    "buffered_file": "spaces' double buffer",
}
ALTERNATIVES = {**RIVALS, **IN_PROCESS}


def measure_alternatives(plan: Plan, weights_file: Path, loader: BufferedFileLoader, shape: Stack,
                         x: torch.Tensor, reference: torch.Tensor,
                         say: Callable[[str], None]) -> dict[str, Any]:
    """The same calls without zerogpu, in this process; per-call loaders take turns each round."""
    device = torch.device("cuda" if plan.backend == "cuda" else "cpu")
    # The model in ordinary (pageable, private) memory, as an app holds it.
    ordinary = {name: tensor.clone() for name, tensor in load_file(weights_file).items()}

    def to_device() -> dict[str, torch.Tensor]:
        return {name: tensor.to(device, copy=True) for name, tensor in ordinary.items()}

    def from_file() -> dict[str, torch.Tensor]:
        if device.type == "cuda":
            return load_file(weights_file, device=str(device))
        # On the CPU load_file maps the file and copies nothing; the device copy is the clone.
        return {name: tensor.clone() for name, tensor in load_file(weights_file).items()}

    per_call = {"to_device": to_device, "load_file": from_file, "buffered_file": lambda: loader.load(device)}
    seconds: dict[str, list[float]] = {name: [] for name in IN_PROCESS}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in IN_PROCESS}
    for i in range(plan.repeat):
        for name, load in per_call.items():
            say(f"alternatives: {IN_PROCESS[name]} {i + 1}/{plan.repeat}")
            started = time.perf_counter()
            weights = load()
            output = run_with(shape, weights, x)
            seconds[name].append(time.perf_counter() - started)
            outputs[name].append(output)
            del weights
    # Last, so that no per-call copy shares the device with it.
    resident = ordinary if device.type == "cpu" else {name: t.to(device) for name, t in ordinary.items()}
    for i in range(plan.repeat):
        say(f"alternatives: {IN_PROCESS['in_process']} {i + 1}/{plan.repeat}")
        started = time.perf_counter()
        output = run_with(shape, resident, x)
        seconds["in_process"].append(time.perf_counter() - started)
        outputs["in_process"].append(output)
    results = {}
    for name, label in IN_PROCESS.items():
        results[name] = median_of(seconds[name])
        results[name]["label"] = label
        results[name]["output"] = worst([compare(output, reference) for output in outputs[name]])
    results["buffered_file"]["o_direct"] = loader.direct
    results["buffered_file"]["buffers"] = [BUFFER_COUNT, BUFFER_BYTES]
    return results
