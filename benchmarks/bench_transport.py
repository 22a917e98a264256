"""How fast a result crosses from a forked worker to its caller, against the obvious alternatives.

    python benchmarks/bench_transport.py [--sizes 1KB,1MB,16MB,256MB,1GB] [--repeat N] [--json PATH]

Sizes are binary (1MB = 2**20 bytes); throughput is in GB/s of 10**9 bytes.
For each size a forked worker holds a float32 tensor and, on each request,
sends it to the caller, which times from the request to the rebuilt tensor
in its hands ("delivered") and then copies the tensor's bytes once into a
buffer of its own ("read once": for a tensor mapped from shared memory this
is where its pages are first touched). Medians over the repeats; each path's
first delivery is checked bit for bit.

Paths:
  zerogpu.call.transport  Channel.send / Channel.recv (shared memory from 4 MB up)
  pickle in frame    torch's own pickling (cloudpickle), bytes through the same socket
  memcpy             numpy.copyto of the same bytes in one process: one copy, no IPC

A second table times messages without tensors (a dict of 10,000 small
items) through dumps/loads against cloudpickle.dumps/pickle.loads.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from rich.table import Table

from zerogpu.call import transport
from zerogpu.call.transport import Channel

from report import command_line, console, describe_size, gbps, machine, median, size_argument, timed, write_figures


def serve(channel: Channel, size: int, path: str) -> None:
    """The worker: on each request, send the tensor the way `path` says."""
    # torch's OpenMP threads hang in a process forked after its parent used them.
    torch.set_num_threads(1)
    tensor = torch.from_numpy(np.random.default_rng(size).random(size // 4, dtype=np.float32))
    channel.send(None, to_device=False)  # ready
    while True:
        try:
            request = channel.recv()
        except EOFError:
            return
        if request != "send":
            return
        if path == "zerogpu.call.transport":
            channel.send(tensor, to_device=False)
        else:
            channel.send_bytes(cloudpickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL))


def measure_path(size: int, path: str, repeat: int) -> dict:
    left, right = socket.socketpair()
    caller, worker_end = Channel(left), Channel(right)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            caller.close()
            serve(worker_end, size, path)
            code = 0
        finally:
            os._exit(code)
    worker_end.close()
    expected = torch.from_numpy(np.random.default_rng(size).random(size // 4, dtype=np.float32))
    own = np.empty(size, dtype=np.uint8)
    delivered, read_once = [], []
    bit_exact = None
    try:
        caller.recv(timeout=600)
        for _ in range(repeat + 1):  # the first round checks the bits and warms up; it is not timed
            started = time.perf_counter()
            caller.send("send", to_device=False)
            if path == "zerogpu.call.transport":
                result = caller.recv(timeout=600)
            else:
                result = pickle.loads(caller.recv_bytes(timeout=600))
            got = time.perf_counter()
            np.copyto(own, result.numpy().view(np.uint8))
            done = time.perf_counter()
            if bit_exact is None:
                bit_exact = bool(np.array_equal(own, expected.numpy().view(np.uint8)))
            else:
                delivered.append(got - started)
                read_once.append(done - started)
            del result
        caller.send("stop", to_device=False)
    finally:
        caller.close()
        os.waitpid(pid, 0)
        transport.remove_segments_of(pid)
    return row(size, path, delivered, read_once, bit_exact)


def measure_memcpy(size: int, repeat: int) -> dict:
    source = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    target = np.empty(size, dtype=np.uint8)
    np.copyto(target, source)
    seconds = [timed(lambda: np.copyto(target, source))[0] for _ in range(repeat)]
    return row(size, "memcpy", seconds, seconds, None)


def row(size: int, path: str, delivered: list[float], read_once: list[float], bit_exact: bool | None) -> dict:
    return {
        "size": size,
        "path": path,
        "delivered_s": median(delivered),
        "read_once_s": median(read_once),
        "delivered_gbps": gbps(size, delivered),
        "read_once_gbps": gbps(size, read_once),
        "bit_exact": bit_exact,
        "delivered_all_s": delivered,
        "read_once_all_s": read_once,
    }


def measure_objects(repeat: int) -> list[dict]:
    message = {f"key {i}": [i, f"value {i}", (i * 0.5, None)] for i in range(10_000)}
    rows = []
    for name, dump, load in (
        ("zerogpu.call.transport", lambda: transport.dumps(message, to_device=False), transport.loads),
        ("cloudpickle", lambda: cloudpickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), pickle.loads),
    ):
        dumped, loaded = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            data = dump()
            middle = time.perf_counter()
            assert load(data) == message
            dumped.append(middle - started)
            loaded.append(time.perf_counter() - middle)
        rows.append(
            {
                "path": name,
                "bytes": len(data),
                "dumps_s": median(dumped),
                "loads_s": median(loaded),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1KB,1MB,16MB,256MB,1GB", help="comma-separated tensor sizes")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per path and size (default 5)")
    parser.add_argument("--json", type=Path, default=Path("bench_transport.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    sizes = [size_argument(text) for text in args.sizes.split(",")]
    if args.repeat < 1 or any(size < 4 or size % 4 for size in sizes):
        parser.error("repeat must be positive and sizes multiples of 4 bytes")

    out = console()
    results = []
    for size in sizes:
        out.print(f"measuring {describe_size(size)} ...")
        for path in ("zerogpu.call.transport", "pickle in frame"):
            results.append(measure_path(size, path, args.repeat))
        results.append(measure_memcpy(size, args.repeat))
    objects = measure_objects(args.repeat)

    table = Table(title=f"tensor result, worker -> caller (median of {args.repeat})")
    for column in ("size", "path", "delivered s", "GB/s", "read once s", "GB/s", "bit exact"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for result in results:
        table.add_row(
            describe_size(result["size"]),
            result["path"],
            f"{result['delivered_s']:.5f}",
            f"{result['delivered_gbps']:.2f}",
            f"{result['read_once_s']:.5f}",
            f"{result['read_once_gbps']:.2f}",
            "" if result["bit_exact"] is None else ("yes" if result["bit_exact"] else "NO"),
        )
    out.print(table)
    table = Table(title="message without tensors: a dict of 10,000 small items")
    for column in ("path", "bytes", "dumps s", "loads s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for result in objects:
        table.add_row(result["path"], str(result["bytes"]), f"{result['dumps_s']:.5f}", f"{result['loads_s']:.5f}")
    out.print(table)

    report = {
        "benchmark": "transport",
        "command": command_line(argv),
        "threshold_bytes": transport.TENSOR_SHM_THRESHOLD,
        "machine": machine(),
        "repeat": args.repeat,
        "tensors": results,
        "objects": objects,
    }
    write_figures(args.json, report, out)
    return 1 if any(result["bit_exact"] is False for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
