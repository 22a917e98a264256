"""The bench's report: the machine it ran on, whether every output matched, and the table."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch
from rich.table import Table

from ..units import describe_size


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def passed(report: dict[str, Any]) -> bool:
    """Whether every path gave zerogpu's output."""
    verdicts = [report["cold_call"]["output"], report["warm_call"]["output"]]
    verdicts += [result["output"] for result in report["restore_strategies"].values()]
    verdicts += [result["output"] for result in report["alternatives"].values()]
    return not any(verdict.startswith("DIFFERENT") for verdict in verdicts)


def render(report: dict[str, Any]) -> Table:
    """One table of every figure; medians over the repeats."""
    backend = report["backend"]
    where = (f"GPU: {report['device']}" if backend == "cuda"
             else "emulated backend, no GPU: host memory stands in for device memory")
    model = report["model"]
    table = Table(
        title=f"zerogpu bench, {where}\n{describe_size(model['bytes'])} model ({model['layers']} layers of "
              f"{model['width']} x {model['width']} float32), batch {model['batch']}, "
              f"median of {report['repeat']}",
        caption="copy engine: restores into a device buffer allocated once.\n"
                "/ cold: the time as a ratio to zerogpu's cold call. "
                "output: compared with zerogpu's first call.",
    )
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("/ cold", justify="right")
    table.add_column("output")

    pack = report["pack"]
    table.add_row("zerogpu pack (once)", seconds(pack["median"]), rate(pack["gbps"]), "", "")
    for key, label in (("cold_call", "zerogpu cold call"), ("warm_call", "zerogpu warm call")):
        call = report[key]
        table.add_row(label, seconds(call["median"]), "", "1.00" if key == "cold_call" else
                      ratio(call["median"] / report["cold_call"]["median"]), call["output"], style="bold")
        for phase, figures in call["phases"].items():
            name = f"  {phase}" + (f" ({call['restore_strategy']})" if phase == "restore" else "")
            speed = rate(call["restore_gbps"]) if phase == "restore" else ""
            table.add_row(name, seconds(figures["median"]), speed, "", "", style="dim")
    table.add_section()
    for strategy, figures in report["restore_strategies"].items():
        table.add_row(f"copy engine: {strategy}", seconds(figures["median"]), rate(figures["gbps"]), "",
                      figures["output"])
    table.add_section()
    for figures in report["alternatives"].values():
        label = figures["label"]
        if "o_direct" in figures:
            label += " (O_DIRECT)" if figures["o_direct"] else " (page cache)"
        table.add_row(label, seconds(figures["median"]), "", ratio(figures["ratio_to_cold"]), figures["output"])
    return table


def seconds(value: float) -> str:
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def rate(gbps: float) -> str:
    return f"{gbps:.2f}"


def ratio(value: float) -> str:
    return f"{value:.2f}"
