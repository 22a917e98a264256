"""The bench's model, how its outputs are checked against zerogpu's, and the median of timings."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from .sizes import WIDTH, layer_bytes, model_shape  # noqa: F401 - the model's shape, planned without torch

BATCH = 8  # rows of the input each call runs
SEED = 0
# Outputs this close count as the same: kernels may sum in another order on another device, or
# in another process whose inputs lie at other alignments (a matmul then takes other vector
# paths). The error of a sum is relative to its terms, not to its result, so the bound is
# relative to the largest output, not to each element; a corrupt restore is off by far more.
RTOL, ATOL = 1e-4, 1e-6


class Stack(torch.nn.Module):
    """The bench's model: square linear layers, each followed by tanh to keep values bounded."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build_model(layers: int, width: int) -> Stack:
    """A seeded model in host memory, initialised as torch.nn.Linear does (uniform in ±1/sqrt(width))."""
    with torch.device("meta"):
        model = Stack(layers, width)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(SEED)
    bound = 1 / math.sqrt(width)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-bound, bound, generator=generator)
    return model.eval()


def skeleton(layers: int, width: int) -> Stack:
    """The model without weights, to run with weights from anywhere (torch.func.functional_call)."""
    with torch.device("meta"):
        return Stack(layers, width).eval()


def run_with(model: Stack, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's output for `x` with `weights`, back in host memory (which waits for the device)."""
    device = next(iter(weights.values())).device
    with torch.inference_mode():
        return torch.func.functional_call(model, weights, (x.to(device),)).cpu()


def compare(output: torch.Tensor, reference: torch.Tensor) -> str:
    """'identical', 'close (max diff ...)' or 'DIFFERENT (...)'."""
    if torch.equal(output, reference):
        return "identical"
    if output.shape != reference.shape:
        return f"DIFFERENT (shape {tuple(output.shape)}, not {tuple(reference.shape)})"
    diff = (output - reference).abs().max().item()
    if diff <= RTOL * reference.abs().max().item() + ATOL:
        return f"close (max diff {diff:.1e})"
    return f"DIFFERENT (max diff {diff:.1e})"


def worst(verdicts: list[str]) -> str:
    """The verdict to show for several outputs: any difference, else any inexactness."""
    for prefix in ("DIFFERENT", "close"):
        for verdict in verdicts:
            if verdict.startswith(prefix):
                return verdict
    return verdicts[0]


def median_of(samples: list[float]) -> dict[str, Any]:
    return {"seconds": samples, "median": statistics.median(samples), "min": min(samples), "max": max(samples)}
