"""What a @zerogpu.GPU call costs on top of calling the function in-process.

    python benchmarks/bench_call.py [--repeat 20] [--fork-sizes 100MB,4GB] [--json PATH]

Part one times a trivial function on a small model three ways in one run:
in-process, cold (fork, attach, restore, run, return) and warm (a worker kept
from the previous call). Part two measures how long the parent takes to fork
with a small and a large packed model, each in a process of its own, and the
same with the model left in ordinary memory, to show why packing matters; the
processes fork in turns, so that the machine's load falls on all of them alike. Runs on
the emulated backend unless a GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rich.table import Table

from zerogpu.bench.model import build_model, model_shape
from zerogpu.units import describe_size, parse_size

from report import command_line, console, machine, median, write_figures


def model_of_size(nbytes: int):
    """`zerogpu bench`'s model (square float32 linear layers, each followed by tanh), about nbytes in all."""
    return build_model(*model_shape(nbytes))


def enable(idle_timeout: float) -> None:
    os.environ["ZEROGPU_IDLE_TIMEOUT"] = str(idle_timeout)
    os.environ.setdefault("ZEROGPU_QUOTA", "anonymous=1e9")
    import zerogpu

    zerogpu.enable()


def median_ms(samples: list[float]) -> float:
    return median(samples) * 1e3


def measure_overhead(repeat: int, model_bytes: int) -> dict:
    """In-process, cold and warm medians for a trivial function, with the cold call's phases."""
    import torch

    import zerogpu
    from zerogpu.call.call import Call
    from zerogpu.call.warm import pool

    model = model_of_size(model_bytes)
    first = model.layers[0]
    x = torch.randn(1, first.in_features)

    def first_row(x):
        return first(x)[0, :4]

    in_process = []
    for _ in range(repeat):
        started = time.perf_counter()
        first_row(x)
        in_process.append(time.perf_counter() - started)

    model.to("cuda")
    zerogpu.startup()
    task = zerogpu.GPU(duration=60)(lambda x: first_row(x.to("cuda"))).zerogpu

    def timed_call() -> tuple[float, dict]:
        started = time.perf_counter()
        call = Call(task, (x,), {})
        call.start()
        for _ in call.messages():
            pass
        return time.perf_counter() - started, call.phases

    os.environ["ZEROGPU_IDLE_TIMEOUT"] = "0"
    cold, phases = [], {name: [] for name in ("queue", "fork", "attach", "restore", "run", "return", "release")}
    for _ in range(repeat):
        seconds, seen = timed_call()
        cold.append(seconds)
        for name in phases:
            phases[name].append(seen.get(name, 0.0))
    os.environ["ZEROGPU_IDLE_TIMEOUT"] = "60"
    timed_call()  # leaves a warm worker
    warm = [timed_call()[0] for _ in range(repeat)]
    pool.close()
    return {
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "in_process_ms": median_ms(in_process),
        "cold_ms": median_ms(cold),
        "warm_ms": median_ms(warm),
        "cold_phases_ms": {name: median_ms(values) for name, values in phases.items()},
    }


def probe_fork(nbytes: int, packed: bool) -> None:
    """In this process: build a model, pack it (or not), then time one fork per line read."""
    enable(0)
    import psutil

    import zerogpu
    from zerogpu.call import worker

    model = model_of_size(nbytes)
    model.to("cuda")
    if packed:
        zerogpu.startup()
    memory = psutil.Process().memory_full_info()
    print(json.dumps({
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "packed": packed,
        "rss_anon_bytes": memory.rss - memory.shared,
    }), flush=True)
    for _ in sys.stdin:
        started = time.perf_counter()
        pid = worker.fork()
        if pid == 0:
            os._exit(0)
        print(time.perf_counter() - started, flush=True)
        os.waitpid(pid, 0)


def measure_forks(sizes: list[int], repeat: int) -> list[dict]:
    """Fork times of one process per (size, packed), taken in turns so that load hits all alike."""
    probes = []
    for size in sizes:
        for packed in (True, False):
            command = [sys.executable, __file__, "--probe-fork", str(size)] + ([] if packed else ["--unpacked"])
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            probes.append((process, json.loads(process.stdout.readline())))
    samples: list[list[float]] = [[] for _ in probes]
    try:
        for _ in range(repeat):
            for (process, _), taken in zip(probes, samples):
                process.stdin.write("fork\n")
                process.stdin.flush()
                taken.append(float(process.stdout.readline()))
    finally:
        for process, _ in probes:
            process.stdin.close()
            process.wait()
    return [dict(info, fork_ms=median_ms(taken)) for (_, info), taken in zip(probes, samples)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--model-size", default="16MB", help="model of the per-call overhead part")
    parser.add_argument("--fork-sizes", default="100MB,4GB")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--probe-fork", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--unpacked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.probe_fork is not None:
        probe_fork(args.probe_fork, packed=not args.unpacked)
        return 0

    forks = measure_forks([parse_size(text) for text in args.fork_sizes.split(",")], args.repeat)
    enable(0)
    from zerogpu import runtime

    overhead = measure_overhead(args.repeat, parse_size(args.model_size))
    backend = runtime.backend()

    out = console()
    table = Table(title=f"Per-call overhead ({backend} backend, model {describe_size(overhead['model_bytes'])}, "
                        f"median of {args.repeat})")
    table.add_column("call")
    table.add_column("ms", justify="right")
    table.add_column("x in-process", justify="right")
    for name in ("in_process", "cold", "warm"):
        ms = overhead[f"{name}_ms"]
        table.add_row(name.replace("_", "-"), f"{ms:.2f}", f"{ms / overhead['in_process_ms']:.0f}")
    for name, ms in overhead["cold_phases_ms"].items():
        table.add_row(f"  cold: {name}", f"{ms:.2f}", "")
    out.print(table)

    table = Table(title=f"Parent fork time by model size (median of {args.repeat})")
    table.add_column("model")
    table.add_column("weights in")
    table.add_column("fork ms", justify="right")
    table.add_column("ratio to smallest", justify="right")
    for packed in (True, False):
        rows = [f for f in forks if f["packed"] == packed]
        for row in rows:
            table.add_row(describe_size(row["model_bytes"]), "snapshot" if packed else "ordinary memory",
                          f"{row['fork_ms']:.2f}", f"{row['fork_ms'] / rows[0]['fork_ms']:.2f}")
    out.print(table)

    if args.json:
        write_figures(args.json, {"benchmark": "call", "command": command_line(argv), "machine": machine(),
                                  "backend": backend, "repeat": args.repeat, "overhead": overhead, "forks": forks}, out)
    runtime.disable()
    return 0


if __name__ == "__main__":
    sys.exit(main())
