"""What every benchmark shares: the machine it ran on, sizes, timing, medians and GB/s, the console
and the JSON file of figures."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console

from zerogpu.bench.report import machine as bench_machine
from zerogpu.errors import InvalidArgument
from zerogpu.units import describe_size, parse_size

__all__ = ["command_line", "console", "describe_size", "gbps", "machine", "median", "size_argument",
           "Timings", "timed", "write_figures"]

T = TypeVar("T")


def machine(**extra: object) -> dict:
    """The date, the machine `zerogpu bench` reports (platform, CPUs, memory, Python, torch),
    the load, numpy's version, and `extra`."""
    return {
        "date": date.today().isoformat(),
        **bench_machine(),
        "load_average": os.getloadavg(),
        "numpy": np.__version__,
        **extra,
    }


def size_argument(text: str) -> int:
    """argparse's type= for sizes such as 1GB or 512MiB (binary units)."""
    try:
        return parse_size(text)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Seconds `call` took, and what it returned."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def gbps(nbytes: int, samples: list[float]) -> float:
    """Throughput of the median sample, in GB/s of 10**9 bytes."""
    return nbytes / median(samples) / 1e9


class Timings:
    """The median and GB/s of a measurement's `seconds`, for a class that also says its `nbytes`."""

    seconds: list[float]
    nbytes: int

    @property
    def median(self) -> float:
        return median(self.seconds)

    @property
    def gbps(self) -> float:
        return gbps(self.nbytes, self.seconds)


def console() -> Console:
    """A console that keeps tables readable when the output goes to a file."""
    return Console(width=None if sys.stdout.isatty() else 140)


def command_line(argv: list[str] | None) -> str:
    """The command that ran, as the report records it."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])


def write_figures(path: Path, report: dict, out: Console) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
    out.print(f"figures written to {path}")


def race(procs: list, timeout: float = 60) -> float:
    """Seconds for client processes to do their work, started together.

    Each process prints "ready", waits for "go" on its stdin, works, then prints
    one line. The processes are waited for however this ends.
    """
    try:
        for proc in procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a client did not start: {line!r}")
        began = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            float(proc.stdout.readline())
        return time.perf_counter() - began
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout)
            proc.stdout.close()
