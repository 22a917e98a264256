"""The call path's speed targets, each measured against its reference in one run.

    python benchmarks/bench_targets.py [--repeat 15] [--model-size 64MB] [--seconds 2]
                                       [--tensor-bytes 512MB] [--json PATH]

- cold call of a trivial function on a --model-size model, and the same minus its
  `release` phase (the worker's exit, reap and the lease's release): the caller
  should not wait for teardown;
- warm call, one thread: p50 against ProcessPoolExecutor(1).submit(...).result(),
  the calls interleaved one for one (target: at most 1.5x);
- warm calls from 4 threads on 4 emulated GPUs for --seconds: calls per second
  against a multiprocessing.Pool(4) driven by 4 threads, in alternating rounds
  (target: at least 0.8x), with the parent's CPU per call beside each (the 4
  threads share one interpreter lock, so that figure bounds the rate);
- the same --tensor-bytes in 10,000 tensors and in 100: Snapshot.pack and a cold
  call, each count in a process of its own, in turns (target: at most 1.3x).

Runs on the emulated backend. Medians with [min-max] ranges; the load average
before and after.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("ZEROGPU_BACKEND", "emulated")
os.environ.setdefault("ZEROGPU_EMULATED_GPUS", "4")
os.environ.setdefault("ZEROGPU_QUOTA", "anonymous=1e9")
if "ZEROGPU_DATA_DIR" not in os.environ:
    # A quota ledger of its own, empty: one left by earlier runs would hold their charges.
    os.environ["ZEROGPU_DATA_DIR"] = tempfile.mkdtemp(prefix="zerogpu-bench-")
    atexit.register(shutil.rmtree, os.environ["ZEROGPU_DATA_DIR"], True)

from report import command_line, machine, median, write_figures  # noqa: E402


def trivial() -> int:
    return 1


def spread(samples: list[float], scale: float = 1e3) -> dict:
    return {"median": median(samples) * scale, "min": min(samples) * scale, "max": max(samples) * scale}


def show(name: str, figure: dict, unit: str = "ms") -> str:
    return f"{name}: {figure['median']:.2f} {unit} [{figure['min']:.2f}-{figure['max']:.2f}]"


def measure_calls(repeat: int, model_bytes: int, seconds: float) -> dict:
    import warnings

    import torch

    import zerogpu
    from zerogpu.bench.model import build_model, model_shape

    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    from zerogpu.call.warm import pool

    os.environ["ZEROGPU_IDLE_TIMEOUT"] = "0"
    zerogpu.enable()
    model = build_model(*model_shape(model_bytes))
    model.to("cuda")
    zerogpu.startup()
    first = model.layers[0]

    @zerogpu.GPU(duration=60)
    def forward_row():
        return float(first.weight[0, 0])

    @zerogpu.GPU(duration=60)
    def nothing():
        return 1

    from zerogpu.call.call import Call

    cold, release = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        call = Call(forward_row.zerogpu, (), {})
        call.start()
        for _ in call.messages():
            pass
        cold.append(time.perf_counter() - started)
        release.append(call.phases.get("release", 0.0))
    minus = [c - r for c, r in zip(cold, release)]

    os.environ["ZEROGPU_IDLE_TIMEOUT"] = "60"
    nothing()  # a warm worker for the next calls
    warm, executor_times = [], []
    with concurrent.futures.ProcessPoolExecutor(1) as executor:
        executor.submit(trivial).result()
        for _ in range(max(repeat * 20, 200)):
            started = time.perf_counter()
            nothing()
            warm.append(time.perf_counter() - started)
            started = time.perf_counter()
            executor.submit(trivial).result()
            executor_times.append(time.perf_counter() - started)

    def rate(call) -> tuple[float, float]:
        """Calls per second from 4 threads, and this process's CPU seconds per call (all its threads):
        the 4 threads share one interpreter lock, so the parent's CPU per call bounds the rate."""
        count = [0] * 4
        cpu, started = time.process_time(), time.monotonic()
        stop = started + seconds

        def loop(i: int) -> None:
            # At least one call each, and the rate over the time the calls really took: a
            # thread that a busy machine starts late still counts.
            while True:
                call()
                count[i] += 1
                if time.monotonic() >= stop:
                    return

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        calls = sum(count)
        return calls / (time.monotonic() - started), (time.process_time() - cpu) / calls

    ours, theirs, our_cpu, their_cpu = [], [], [], []
    with multiprocessing.get_context("fork").Pool(4) as mp_pool:
        for _ in range(4):
            nothing()
        for _ in range(3):
            for rates, cpus, call in ((ours, our_cpu, nothing), (theirs, their_cpu, lambda: mp_pool.apply(trivial))):
                per_second, cpu_per_call = rate(call)
                rates.append(per_second)
                cpus.append(cpu_per_call)
    pool.close()
    del torch
    return {
        "cold_ms": spread(cold), "release_ms": spread(release), "cold_minus_release_ms": spread(minus),
        "warm_p50_ms": spread(warm), "executor_p50_ms": spread(executor_times),
        "warm_4_threads_per_s": spread(ours, 1), "mp_pool_4_threads_per_s": spread(theirs, 1),
        "warm_4_threads_parent_cpu_us": spread(our_cpu, 1e6), "mp_pool_4_threads_parent_cpu_us": spread(their_cpu, 1e6),
    }


def probe_tensors(count: int, nbytes: int, repeat: int) -> None:
    """In this process: `count` tensors of `nbytes` in all; time Snapshot.pack and a cold call."""
    import torch

    import zerogpu
    from zerogpu.call.call import Call
    from zerogpu.snapshot.snapshot import Snapshot

    numel = nbytes // 4 // count
    tensors = {f"w{i}": torch.randn(numel) for i in range(count)}
    # One pack and one cold call more than asked, the first of each left out: a process's
    # first pack waits for the kernel to find fresh pages for /dev/shm, whatever the tensors.
    packs = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        snapshot = Snapshot.pack(tensors)
        packs.append(time.perf_counter() - started)
        snapshot.close()
    packs = packs[1:]
    os.environ["ZEROGPU_IDLE_TIMEOUT"] = "0"
    zerogpu.enable()
    module = torch.nn.Module()
    for name, tensor in tensors.items():
        module.register_parameter(name, torch.nn.Parameter(tensor))
    del tensors
    started = time.perf_counter()
    module.to("cuda")
    to_cuda = time.perf_counter() - started
    started = time.perf_counter()
    zerogpu.startup()
    startup = time.perf_counter() - started

    @zerogpu.GPU(duration=60)
    def touch():
        return float(module.w0[0])

    colds, restores = [], []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        call = Call(touch.zerogpu, (), {})
        call.start()
        for _ in call.messages():
            pass
        colds.append(time.perf_counter() - started)
        restores.append(call.phases.get("restore", 0.0))
    colds, restores = colds[1:], restores[1:]
    print(json.dumps({"tensors": count, "pack": packs, "cold": colds, "restore": restores,
                      "to_cuda_s": to_cuda, "startup_s": startup}), flush=True)
    from zerogpu import runtime

    runtime.disable()


def measure_tensors(counts: list[int], nbytes: int, repeat: int) -> list[dict]:
    results = []
    for count in counts:
        command = [sys.executable, __file__, "--probe-tensors", str(count), "--tensor-bytes", str(nbytes),
                   "--repeat", str(repeat)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        results.append({"tensors": count, "pack_ms": spread(figures["pack"]), "cold_ms": spread(figures["cold"]),
                        "restore_ms": spread(figures["restore"]), "to_cuda_s": figures["to_cuda_s"],
                        "startup_s": figures["startup_s"]})
    return results


def main(argv: list[str] | None = None) -> int:
    from zerogpu.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--model-size", default="64MB")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--tensor-bytes", default="512MB")
    parser.add_argument("--tensors", default="100,10000")
    parser.add_argument("--json")
    parser.add_argument("--probe-tensors", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_tensors:
        probe_tensors(args.probe_tensors, parse_size(args.tensor_bytes), args.repeat)
        return 0
    before = os.getloadavg()
    tensors = measure_tensors([int(c) for c in args.tensors.split(",")], parse_size(args.tensor_bytes),
                              max(5, args.repeat // 2))
    calls = measure_calls(args.repeat, parse_size(args.model_size), args.seconds)
    after = os.getloadavg()
    print(f"load average before {before[0]:.2f}, after {after[0]:.2f}")
    for name in ("cold_ms", "release_ms", "cold_minus_release_ms", "warm_p50_ms", "executor_p50_ms"):
        print(show(name, calls[name]))
    print(f"  warm p50 / ProcessPoolExecutor p50: {calls['warm_p50_ms']['median'] / calls['executor_p50_ms']['median']:.2f}x")
    for name in ("warm_4_threads_per_s", "mp_pool_4_threads_per_s"):
        print(show(name, calls[name], "calls/s"))
    print(f"  4-thread throughput / multiprocessing.Pool: "
          f"{calls['warm_4_threads_per_s']['median'] / calls['mp_pool_4_threads_per_s']['median']:.2f}x")
    for name in ("warm_4_threads_parent_cpu_us", "mp_pool_4_threads_parent_cpu_us"):
        print(show(name, calls[name], "µs of the parent's CPU per call"))
    for row in tensors:
        print(f"{row['tensors']} tensors: {show('pack', row['pack_ms'])}; {show('cold', row['cold_ms'])}; "
              f"{show('restore', row['restore_ms'])}; .to(cuda) {row['to_cuda_s']:.2f} s, "
              f"startup {row['startup_s']:.2f} s")
    if len(tensors) == 2:
        small, large = tensors
        print(f"  {large['tensors']} / {small['tensors']} tensors: "
              f"pack {large['pack_ms']['median'] / small['pack_ms']['median']:.2f}x, "
              f"cold {large['cold_ms']['median'] / small['cold_ms']['median']:.2f}x, "
              f"zerogpu.startup() {large['startup_s'] / small['startup_s']:.2f}x (one each)")
    if args.json:
        from rich.console import Console

        write_figures(args.json, {"benchmark": "targets", "command": command_line(argv),
                                  "machine": machine(load_before=before, load_after=after),
                                  "calls": calls, "tensors": tensors}, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
