"""What pinning host memory costs per GB, and what creating a CUDA context costs.

    python benchmarks/bench_pinning.py [--sizes 256MB,1GB] [--repeat 3] [--backend auto] [--json PATH]

- cuMemHostAlloc of each size (Engine.alloc_pinned), then freeing it: what a
  worker pays for a staging ring of that size;
- cuMemHostRegister of each size, as the register strategy does it chunk by
  chunk (a restore of that size in one chunk, its register_seconds);
- the context: Engine(backend) made in a fresh process that has imported
  everything already, so only the driver's work is timed.

On the emulated backend the driver page-locks with mlock within RLIMIT_MEMLOCK
and faults the pages in past it (see zerogpu/cuda/_ext/emulated.cpp).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from report import command_line, console, machine, median, size_argument, write_figures

CONTEXT_PROBE = """
import sys, time
from zerogpu.cuda.engine import Engine
started = time.perf_counter()
engine = Engine(sys.argv[1])
print(time.perf_counter() - started)
engine.close()
"""


def measure(sizes: list[int], repeat: int, backend: str) -> dict:
    from zerogpu.cuda.engine import Engine

    rows = []
    with Engine(backend) as engine:
        for nbytes in sizes:
            alloc, register = [], []
            src = np.ones(nbytes, dtype=np.uint8)
            dst = engine.alloc_buffer(nbytes)
            for _ in range(repeat):
                started = time.perf_counter()
                pinned = engine.alloc_pinned(nbytes)
                alloc.append(time.perf_counter() - started)
                pinned.free()
                stats = engine.restore(src, dst, strategy="register", chunk_bytes=nbytes)
                register.append(stats.register_seconds)
            del dst
            rows.append({"bytes": nbytes, "host_alloc_s": alloc, "register_s": register,
                         "host_alloc_s_per_gb": median(alloc) / (nbytes / 1e9),
                         "register_s_per_gb": median(register) / (nbytes / 1e9)})
    contexts = [float(subprocess.run([sys.executable, "-c", CONTEXT_PROBE, backend], check=True,
                                     capture_output=True, text=True).stdout.split()[-1]) for _ in range(repeat)]
    return {"pinning": rows, "context_s": contexts, "context_median_s": median(contexts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256MB,1GB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("auto", "cuda", "emulated"), default="auto")
    parser.add_argument("--json", type=Path, default=Path("bench_pinning.json"))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = [size_argument(text) for text in args.sizes.split(",")]
    backend = args.backend
    if backend == "auto":
        from zerogpu.cuda import devices

        backend = "cuda" if devices.gpu_visible() else "emulated"
    figures = measure(sizes, args.repeat, backend)
    out = console()
    for row in figures["pinning"]:
        out.print(f"{row['bytes'] / 2**20:.0f} MiB: cuMemHostAlloc {row['host_alloc_s_per_gb']:.3f} s/GB, "
                  f"cuMemHostRegister {row['register_s_per_gb']:.3f} s/GB")
    out.print(f"context creation ({backend}): {figures['context_median_s'] * 1e3:.1f} ms")
    write_figures(args.json, {"benchmark": "pinning", "command": command_line(argv), "machine": machine(),
                              "backend": backend, **figures}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
