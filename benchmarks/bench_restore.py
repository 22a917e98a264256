"""Restore throughput of the copy engine, against the physical limit measured in the same run.

    python benchmarks/bench_restore.py [--sizes 1GB,4GB] [--repeat N] [--json PATH]

Sizes are binary (1GB = 2**30 bytes); throughput is in GB/s of 10**9 bytes.
The source lives in shared memory, as a snapshot does. Every variant's first
restore of each size is checked bit for bit, then it is timed over the
repeats, each time right after a limit copy; the table gives medians, and
each ratio is the median of (limit seconds / restore seconds) over those pairs.

On the emulated backend (no GPU) the limit is numpy.copyto of the same bytes
into the same destination; each strategy runs at every --threads count
(streams = threads, since emulated streams copy on their own threads).

On a GPU the limit is one cuMemcpyHtoD of the same bytes from a pinned
buffer into the same device buffer; each strategy runs with its default
tuning at every --threads count, and the register strategy's cost of
page-locking is reported per GB.

--sweep adds a chunk-size sweep per strategy (on the first size), the
measurement behind the engine's default chunk sizes.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from zerogpu.cuda import engine as zengine
from zerogpu.cuda.engine import STRATEGIES, Engine

from report import (Timings, command_line, console, describe_size, machine, median, size_argument, timed,
                    write_figures)

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
VERIFY_CHUNK = 256 * MiB
SWEEP_CHUNKS = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)


@dataclass
class Result(Timings):
    size: int
    name: str  # "numpy.copyto", "pinned cuMemcpyHtoD" or the strategy
    chunk_bytes: int = 0
    streams: int = 0
    threads: int = 0
    seconds: list[float] = field(default_factory=list)
    # The limit copy timed right before each of `seconds`.
    limit_seconds: list[float] = field(default_factory=list)
    register_seconds: list[float] = field(default_factory=list)
    bit_exact: bool | None = None
    ratio: float | None = None

    @property
    def nbytes(self) -> int:
        return self.size

    def row(self) -> dict:
        data = asdict(self)
        data.update(median_seconds=self.median, gbps=self.gbps)
        if self.register_seconds:
            data["register_seconds_per_gb"] = median(self.register_seconds) / (self.size / 1e9)
        return data


def shared_source(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Bytes in anonymous shared memory (shmem, as /dev/shm is), every page distinct."""
    region = mmap.mmap(-1, nbytes)
    data = np.frombuffer(region, dtype=np.uint8)
    block = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8)
    for start in range(0, nbytes, block.size):
        end = min(start + block.size, nbytes)
        data[start:end] = block[: end - start]
    # Stamp each page with its index, so a chunk copied to the wrong place cannot pass the check.
    pages = nbytes // PAGE
    data[: pages * PAGE].view(np.uint64)[:: PAGE // 8] = np.arange(pages, dtype=np.uint64)
    return region, data


def host_view(address: int, nbytes: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=np.uint8)


class Bench:
    def __init__(self, engine: Engine, args: argparse.Namespace):
        self.engine = engine
        self.args = args
        self.on_gpu = engine.backend == "cuda"
        self.pinned_limit = args.limit == "pinned"
        self.results: list[Result] = []

    def run_size(self, size: int, sweep: bool) -> None:
        region, src = shared_source(size)
        destination = self.engine.alloc(size)
        bounce = self.engine.alloc_pinned(min(VERIFY_CHUNK, size))
        pinned = self.engine.alloc_pinned(size) if self.pinned_limit else None
        try:
            if pinned is not None:
                host_view(pinned.address, size)[:] = src
            limit = self.measure_limit(size, src, destination, pinned)
            variants = self.variants(size, sweep)
            # Each variant's first restore is checked, untimed: it also pays for
            # whatever the engine sets up once (streams, the staging ring).
            for variant in variants:
                self.scrub(destination, bounce)
                self.restore(src, destination, variant)
                variant.register_seconds.clear()
                variant.bit_exact = self.matches(src, destination, bounce)
            # Each timed restore is paired with a limit copy just before it, so
            # both see the same machine state; the ratio is the median of the pairs.
            for _ in range(self.args.repeat):
                for variant in variants:
                    paired = self.limit_once(src, destination, pinned)
                    limit.seconds.append(paired)
                    variant.limit_seconds.append(paired)
                    variant.seconds.append(self.restore(src, destination, variant))
            for variant in variants:
                variant.ratio = median(
                    limit / seconds for limit, seconds in zip(variant.limit_seconds, variant.seconds)
                )
            self.results += [limit, *variants]
        finally:
            bounce.free()
            destination.free()
            if pinned is not None:
                pinned.free()
            del src
            region.close()

    def measure_limit(self, size: int, src: np.ndarray, destination, pinned) -> Result:
        name = "pinned cuMemcpyHtoD" if self.pinned_limit else "numpy.copyto"
        self.limit_once(src, destination, pinned)  # first touch of the destination
        return Result(size, name)

    def limit_once(self, src: np.ndarray, destination, pinned) -> float:
        if self.pinned_limit:
            return self.engine.copy_plain(pinned, destination)
        dst = host_view(destination.address, destination.nbytes)
        return timed(lambda: np.copyto(dst, src))[0]

    def variants(self, size: int, sweep: bool) -> list[Result]:
        variants = []
        for strategy in STRATEGIES:
            default = zengine.DEFAULT_TUNING[self.engine.backend, strategy]
            for threads in self.args.threads:
                streams = threads if not self.on_gpu else default.streams
                variants.append(Result(size, strategy, default.chunk_bytes, streams, threads))
            if sweep:
                for chunk in SWEEP_CHUNKS:
                    if chunk != default.chunk_bytes and chunk < size:
                        variants.append(Result(size, strategy, chunk, default.streams, default.threads))
        return variants

    def restore(self, src: np.ndarray, destination, variant: Result) -> float:
        seconds, stats = timed(lambda: self.engine.restore(
            src,
            destination,
            strategy=variant.name,
            chunk_bytes=variant.chunk_bytes,
            streams=variant.streams,
            threads=variant.threads,
        ))
        if variant.name == "register":
            variant.register_seconds.append(stats.register_seconds)
        return seconds

    def scrub(self, destination, bounce) -> None:
        """Overwrite the destination, so a check cannot pass on an earlier restore's bytes."""
        host_view(bounce.address, bounce.nbytes)[:] = 0xA5
        for offset in range(0, destination.nbytes, bounce.nbytes):
            count = min(bounce.nbytes, destination.nbytes - offset)
            self.engine.copy_plain(bounce.address, destination.address + offset, count)

    def matches(self, src: np.ndarray, destination, bounce) -> bool:
        back = host_view(bounce.address, bounce.nbytes)
        for offset in range(0, destination.nbytes, bounce.nbytes):
            count = min(bounce.nbytes, destination.nbytes - offset)
            self.engine.copy_to_host(bounce.address, destination.address + offset, count)
            if not np.array_equal(back[:count], src[offset : offset + count]):
                return False
        return True


def print_table(out: Console, engine: Engine, results: list[Result]) -> None:
    limit_name = results[0].name
    table = Table(title=f"Restore throughput on {engine.device_name} ({engine.backend})")
    for column in ("size", "copy", "chunk", "streams", "threads", "median s", "GB/s", f"/ {limit_name}", "exact"):
        table.add_column(column, justify="right")
    table.add_column("register s/GB", justify="right")
    for result in results:
        is_limit = result.ratio is None
        per_gb = median(result.register_seconds) / (result.size / 1e9) if result.register_seconds else None
        table.add_row(
            describe_size(result.size),
            result.name,
            "" if is_limit else describe_size(result.chunk_bytes),
            "" if is_limit else str(result.streams),
            "" if is_limit else str(result.threads),
            f"{result.median:.4f}",
            f"{result.gbps:.2f}",
            "1.00" if is_limit else f"{result.ratio:.2f}",
            "" if result.bit_exact is None else ("yes" if result.bit_exact else "NO"),
            "" if per_gb is None else f"{per_gb:.4f}",
        )
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated sizes (default 1GB,4GB; 1GB,4GB,16GB on a GPU)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per copy (default 5)")
    parser.add_argument("--threads", help="comma-separated thread counts (default 1,2; 1,2,4,8 on a GPU)")
    parser.add_argument("--backend", choices=("auto", "cuda", "emulated"), default="auto")
    parser.add_argument(
        "--limit",
        choices=("pinned", "copyto"),
        help="the baseline: one copy from pinned memory (default on a GPU) or numpy.copyto (default emulated)",
    )
    parser.add_argument("--sweep", action="store_true", help="also sweep chunk sizes on the first size")
    parser.add_argument("--json", type=Path, default=Path("bench_restore.json"), help="where to write the figures")
    args = parser.parse_args(argv)

    backend = args.backend
    if backend == "auto":
        backend = "cuda" if zengine.driver_info()["found"] and torch.cuda.is_available() else "emulated"
    on_gpu = backend == "cuda"
    sizes = [size_argument(s) for s in (args.sizes or ("1GB,4GB,16GB" if on_gpu else "1GB,4GB")).split(",")]
    args.limit = args.limit or ("pinned" if on_gpu else "copyto")
    args.threads = [int(t) for t in (args.threads or ("1,2,4,8" if on_gpu else "1,2")).split(",")]
    if args.repeat < 1 or any(t < 1 for t in args.threads) or any(s <= 0 for s in sizes):
        parser.error("repeat, threads and sizes must be positive")

    out = console()
    with Engine(backend) as engine:
        bench = Bench(engine, args)
        for index, size in enumerate(sizes):
            out.print(f"measuring {describe_size(size)} ...")
            bench.run_size(size, sweep=args.sweep and index == 0)
        print_table(out, engine, bench.results)
        report = {
            "benchmark": "restore",
            "command": command_line(argv),
            "backend": backend,
            "device": engine.device_name,
            "driver": zengine.driver_info() if on_gpu else None,
            "machine": machine(),
            "repeat": args.repeat,
            "results": [result.row() for result in bench.results],
        }
    write_figures(args.json, report, out)
    inexact = [r for r in bench.results if r.bit_exact is False]
    return 1 if inexact else 0


if __name__ == "__main__":
    sys.exit(main())
