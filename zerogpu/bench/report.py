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
                "output: compared with zerogpu's first call.\n"
                f"load average {load(report, 'before')} before, {load(report, 'after')} after",
    )
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("range", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("/ cold", justify="right")
    table.add_column("output")

    pack = report["pack"]
    table.add_row("zerogpu pack (once)", seconds(pack["median"]), "", rate(pack["gbps"]), "", "")
    for key, label in (("cold_call", "zerogpu cold call"), ("warm_call", "zerogpu warm call")):
        call = report[key]
        table.add_row(label, seconds(call["median"]), spread(call), "", "1.00" if key == "cold_call" else
                      ratio(call["median"] / report["cold_call"]["median"]), call["output"], style="bold")
        for phase, figures in call["phases"].items():
            name = f"  {phase}" + (f" ({call['restore_strategy']})" if phase == "restore" else "")
            speed = rate(call["restore_gbps"]) if phase == "restore" else ""
            table.add_row(name, seconds(figures["median"]), spread(figures), speed, "", "", style="dim")
        if "pinning" in call:
            table.add_row("  of which pinning, per worker", seconds(call["pinning"]["median"]), spread(call["pinning"]),
                          "", "", "", style="dim")
    table.add_section()
    for strategy, figures in report["restore_strategies"].items():
        table.add_row(f"copy engine: {strategy}", seconds(figures["median"]), spread(figures), rate(figures["gbps"]),
                      "", figures["output"])
    table.add_section()
    for figures in report["alternatives"].values():
        label = figures["label"]
        if "o_direct" in figures:
            label += " (O_DIRECT)" if figures["o_direct"] else " (page cache)"
        table.add_row(label, seconds(figures["median"]), spread(figures), "", ratio(figures["ratio_to_cold"]),
                      figures["output"])
    return table


# A row whose slowest sample took this many times its fastest was measured on a busy machine.
WIDE_SPREAD = 2.0


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every timed row of the report, by its label."""
    found = {"zerogpu cold call": report["cold_call"], "zerogpu warm call": report["warm_call"]}
    found.update({f"copy engine: {name}": figures for name, figures in report["restore_strategies"].items()})
    found.update({figures["label"]: figures for figures in report["alternatives"].values()})
    return found


def warnings(report: dict[str, Any]) -> list[str]:
    """A line for each row whose samples spread so wide that its median says little."""
    lines = []
    for label, figures in rows(report).items():
        low, high = min(figures["seconds"]), max(figures["seconds"])
        if low > 0 and high / low > WIDE_SPREAD:
            lines.append(f"warning: {label} ranged from {seconds(low)} to {seconds(high)} s ({high / low:.1f}x): "
                         "the machine was busy; compare the ratios, or run again with more --repeat")
    return lines


def verdicts(report: dict[str, Any]) -> list[str]:
    """One line per alternative: how zerogpu's cold call compares with it."""
    cold = report["cold_call"]["median"]
    lines = []
    for figures in report["alternatives"].values():
        other = figures["median"]
        if other >= cold:
            lines.append(f"zerogpu cold call: {other / cold:.2f}x faster than {figures['label']}")
        else:
            lines.append(f"zerogpu cold call: {cold / other:.2f}x slower than {figures['label']}")
    return lines


def load(report: dict[str, Any], when: str) -> str:
    figures = report.get("load_average", {}).get(when)
    return "?" if figures is None else f"{figures[0]:.2f}"


def spread(figures: dict[str, Any]) -> str:
    return f"{seconds(figures['min'])}-{seconds(figures['max'])}" if "min" in figures else ""


def seconds(value: float) -> str:
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def rate(gbps: float) -> str:
    return f"{gbps:.2f}"


def ratio(value: float) -> str:
    return f"{value:.2f}"
