"""Packing a model into a shared-memory snapshot, attaching it, and loading safetensors into one.

    python benchmarks/bench_pack.py [--size 1GB] [--repeat N] [--json PATH]

The model is a decoder-only transformer's set of tensors (a few hundred, mixed
sizes, bfloat16 weights and float32 norms, the embedding tied to the output
head) totalling about --size. Each repeat times, in turn:

- Snapshot.pack of the model into a new segment;
- numpy.copyto of the same bytes (each storage once, as pack stores them) into a
  new shared-memory segment, pages allocated by the copy, as pack's are: the
  target is pack at 0.8 of this or better;
- numpy.copyto of the same bytes into a warm buffer (pages already allocated):
  the memory-bandwidth ceiling, which no copy into new memory reaches;
- os.pwrite of the same bytes into a new segment, the way pack copies (pack adds
  the manifest and, where RLIMIT_MEMLOCK allows, locking the segment in RAM);
- posix_fallocate of a new segment of that size: what tmpfs alone takes to
  allocate the pages, the floor under any copy into new shared memory;
- Snapshot.attach of the packed segment and its tensors() from this process;
- Snapshot.load_safetensors of the model saved as a file (in the page cache),
  against safetensors.torch.load_file (which maps the file and reads lazily) and
  against load_file followed by Snapshot.pack, the path it replaces.

Medians over the repeats; GB/s are 10^9 bytes per second.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import posix_ipc
import safetensors
import safetensors.torch
import torch
from rich.table import Table

from zerogpu.snapshot.snapshot import Snapshot

from report import Timings, command_line, console, machine, size_argument, timed, write_figures

MiB = 1 << 20
GiB = 1 << 30
LAYERS = 24
TARGET = 0.8  # pack / numpy.copyto into new shared memory


@dataclass
class Measure(Timings):
    name: str
    nbytes: int
    seconds: list[float] = field(default_factory=list)

    def row(self) -> dict:
        return {"name": self.name, "nbytes": self.nbytes, "seconds": self.seconds,
                "median_seconds": self.median, "gbps": self.gbps}


def locked_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmLck:"))


def model_like(total: int) -> dict[str, torch.Tensor]:
    """A transformer's tensors in about `total` bytes: per layer attention and MLP weights
    in bfloat16, biases, float32 norms; the embedding is also the output head."""
    hidden = max(64, round(math.sqrt(total / (24 * LAYERS + 16)) / 64) * 64)
    mlp = hidden * 8 // 3 // 64 * 64
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    embedding = weight(8 * hidden, hidden)
    tensors = {"embed_tokens.weight": embedding}
    for layer in range(LAYERS):
        prefix = f"layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj"):
            tensors[prefix + f"attn.{name}.weight"] = weight(hidden, hidden)
            tensors[prefix + f"attn.{name}.bias"] = weight(hidden)
        tensors[prefix + "attn.o_proj.weight"] = weight(hidden, hidden)
        tensors[prefix + "mlp.gate_proj.weight"] = weight(mlp, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = weight(mlp, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = weight(hidden, mlp)
        tensors[prefix + "input_norm.weight"] = weight(hidden, dtype=torch.float32)
        tensors[prefix + "post_attention_norm.weight"] = weight(hidden, dtype=torch.float32)
    tensors["norm.weight"] = weight(hidden, dtype=torch.float32)
    tensors["lm_head.weight"] = embedding
    return tensors


def distinct_storages(tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The bytes of each storage once, as pack copies them."""
    seen: dict[int, np.ndarray] = {}
    for tensor in tensors.values():
        storage = tensor.untyped_storage()
        seen.setdefault(storage.data_ptr(), torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    return list(seen.values())


def new_segment(nbytes: int) -> posix_ipc.SharedMemory:
    """A new segment for a baseline, named apart from zerogpu's (which test suites watch)."""
    return posix_ipc.SharedMemory(f"/bench-pack-{os.getpid()}-{secrets.token_hex(8)}", posix_ipc.O_CREX,
                                  mode=0o600, size=nbytes)


def spread(sources: list[np.ndarray]) -> int:
    """Bytes the sources take laid out one after another, each on a 256-byte boundary."""
    return sum(-(-source.size // 256) * 256 for source in sources)


def copyto_new_segment(sources: list[np.ndarray], nbytes: int) -> float:
    start = time.perf_counter()
    segment = new_segment(nbytes)
    try:
        mapping = mmap.mmap(segment.fd, nbytes)
        destination = np.frombuffer(mapping, dtype=np.uint8)
        copy_each(sources, destination)
        elapsed = time.perf_counter() - start
        del destination
        mapping.close()
    finally:
        segment.close_fd()
        segment.unlink()
    return elapsed


def pwrite_new_segment(sources: list[np.ndarray], nbytes: int) -> float:
    start = time.perf_counter()
    segment = new_segment(nbytes)
    try:
        offset = 0
        for source in sources:
            view = memoryview(source)
            done = 0
            while done < len(view):
                done += os.pwrite(segment.fd, view[done:], offset + done)
            offset += -(-source.size // 256) * 256
        return time.perf_counter() - start
    finally:
        segment.close_fd()
        segment.unlink()


def copy_each(sources: list[np.ndarray], destination: np.ndarray) -> None:
    offset = 0
    for source in sources:
        np.copyto(destination[offset:offset + source.size], source)
        offset += -(-source.size // 256) * 256


def fallocate_new_segment(nbytes: int) -> float:
    start = time.perf_counter()
    segment = new_segment(nbytes)
    try:
        os.posix_fallocate(segment.fd, 0, nbytes)
        return time.perf_counter() - start
    finally:
        segment.close_fd()
        segment.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_argument, default="1GB", help="total bytes of the model (default 1GB)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats of each measurement (default 5)")
    parser.add_argument("--json", type=Path, default=Path("bench_pack.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    size = args.size
    if args.repeat < 1 or size <= 0:
        parser.error("--repeat and --size must be positive")

    out = console()
    tensors = model_like(size)
    sources = distinct_storages(tensors)
    nbytes = sum(source.size for source in sources)
    out.print(f"model: {len(tensors)} tensors, {len(sources)} storages, {nbytes / GiB:.3f} GiB")

    pack = Measure("Snapshot.pack", nbytes)
    copyto_new = Measure("numpy.copyto, new shared memory", nbytes)
    copyto_warm = Measure("numpy.copyto, warm memory", nbytes)
    pwrite = Measure("os.pwrite, new shared memory", nbytes)
    fallocate = Measure("posix_fallocate, new shared memory", nbytes)
    attach = Measure("Snapshot.attach + tensors()", nbytes)
    load = Measure("Snapshot.load_safetensors", nbytes - tensors["lm_head.weight"].nbytes)
    load_file = Measure("safetensors load_file (lazy)", load.nbytes)
    load_file_pack = Measure("load_file + Snapshot.pack", load.nbytes)
    measures = [pack, copyto_new, copyto_warm, pwrite, fallocate, attach, load, load_file, load_file_pack]

    warm = np.ones(spread(sources), dtype=np.uint8)
    locked = []
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        path = Path(directory) / "model.safetensors"
        untied = {name: tensor for name, tensor in tensors.items() if name != "lm_head.weight"}
        safetensors.torch.save_file(untied, path)
        for index in range(args.repeat):
            out.print(f"repeat {index + 1}/{args.repeat} ...")
            seconds, snapshot = timed(lambda: Snapshot.pack(tensors))
            pack.seconds.append(seconds)
            locked.append(locked_bytes() >= nbytes)
            with snapshot:
                seconds, attached = timed(lambda: Snapshot.attach(snapshot.name))
                seconds += timed(attached.tensors)[0]
                attach.seconds.append(seconds)
                attached.close()
            copyto_new.seconds.append(copyto_new_segment(sources, spread(sources)))
            copyto_warm.seconds.append(timed(lambda: copy_each(sources, warm))[0])
            pwrite.seconds.append(pwrite_new_segment(sources, spread(sources)))
            fallocate.seconds.append(fallocate_new_segment(nbytes))
            seconds, loaded = timed(lambda: Snapshot.load_safetensors(path))
            load.seconds.append(seconds)
            loaded.close()
            load_file.seconds.append(timed(lambda: safetensors.torch.load_file(path))[0])
            seconds, packed = timed(lambda: Snapshot.pack(safetensors.torch.load_file(path)))
            load_file_pack.seconds.append(seconds)
            packed.close()

    ratios = {
        "pack / copyto new shared memory": pack.gbps / copyto_new.gbps,
        "pack / copyto warm memory": pack.gbps / copyto_warm.gbps,
        "pack / pwrite": pack.gbps / pwrite.gbps,
        "pack / fallocate": pack.gbps / fallocate.gbps,
        "load_safetensors / load_file": load.gbps / load_file.gbps,
        "load_safetensors / load_file + pack": load.gbps / load_file_pack.gbps,
    }
    table = Table(title=f"Pack {nbytes / GiB:.2f} GiB ({len(tensors)} tensors), median of {args.repeat}")
    for column in ("measurement", "median s", "range s", "GB/s"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for measure in measures:
        rate = "" if measure is attach else f"{measure.gbps:.2f}"  # attaching copies nothing
        table.add_row(measure.name, f"{measure.median:.4f}", f"{min(measure.seconds):.4f}-{max(measure.seconds):.4f}",
                      rate)
    out.print(table)
    for warning in {str(warning.message) for warning in caught}:
        out.print(warning)
    for name, ratio in ratios.items():
        out.print(f"{name}: {ratio:.2f}")
    met = ratios["pack / copyto new shared memory"] >= TARGET
    out.print(f"target pack >= {TARGET} x numpy.copyto into new shared memory: {'met' if met else 'NOT met'}; "
                  f"segment locked in RAM: {'yes' if all(locked) else 'no (RLIMIT_MEMLOCK)'}")

    report = {
        "benchmark": "pack",
        "command": command_line(argv),
        "machine": machine(safetensors=safetensors.__version__, euid=os.geteuid(),
                           memlock_limit=open("/proc/self/limits").read().split("Max locked memory")[1].split()[:2]),
        "size": nbytes,
        "tensors": len(tensors),
        "storages": len(sources),
        "repeat": args.repeat,
        "locked": all(locked),
        "results": [measure.row() for measure in measures],
        "ratios": ratios,
        "target": {"pack / copyto new shared memory": TARGET, "met": met},
    }
    write_figures(args.json, report, out)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
