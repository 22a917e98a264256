"""The bench's arguments, and whether this machine has room for the run they ask for."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from .. import units
from ..errors import InvalidArgument
from ..snapshot import segments
from ..units import describe_size
from .sizes import BUFFER_BYTES, BUFFER_COUNT, PAGE, layer_bytes, model_shape

MiB = 2**20
MIN_SIZE = MiB
DEFAULT_SIZE = "1GB"  # a model a laptop holds twice over
DEFAULT_REPEAT = 3
# Host memory held at once, in copies of the weights: the model and its snapshot
# while it is packed; later the snapshot (or the weights in ordinary memory) and
# the copy one call restores or loads, which is host memory on the emulated
# backend and device memory on a GPU. Plus the read buffers.
HOST_COPIES = 2
DEVICE_COPIES = 4


def parse_size(text: str) -> int:
    """The model size asked for: '64MB', '1GB', '1.5GiB', '512MiB' (binary units, see zerogpu.units)."""
    size = units.parse_size(text, "--size")
    if size < MIN_SIZE:
        raise InvalidArgument(f"--size {text} is below the smallest model the bench builds, 1MB: ask for more")
    return size


@dataclass(frozen=True)
class Plan:
    """What one run will do, checked before anything is allocated."""

    layers: int
    width: int
    repeat: int
    backend: str
    device_name: str
    workdir: Path
    json_path: Path | None

    @property
    def nbytes(self) -> int:
        return self.layers * layer_bytes(self.width)


def parse_repeat(text: str | int) -> int:
    try:
        repeat = int(text)
    except ValueError:
        raise InvalidArgument(f"--repeat {text!r} is not a whole number: write e.g. --repeat 3") from None
    if repeat < 1:
        raise InvalidArgument(f"--repeat {repeat} must be a whole number of at least 1")
    return repeat


def plan(size: str, repeat: str | int, json_path: str | os.PathLike | None = None) -> Plan:
    """Check the arguments and this machine's room for them; InvalidArgument says what is wrong.

    Everything but the device's own size is checked before torch is imported.
    """
    nbytes = parse_size(size)
    repeat = parse_repeat(repeat)
    target = Path(json_path) if json_path is not None else None
    if target is not None:
        if not target.parent.is_dir():
            raise InvalidArgument(f"--json {json_path}: the folder {target.parent} does not exist")
        if target.is_dir() or not os.access(target.parent, os.W_OK):
            raise InvalidArgument(f"--json {json_path}: cannot write a file there; name a file in a writable folder")
    layers, width = model_shape(nbytes)
    nbytes = layers * layer_bytes(width)

    host = HOST_COPIES * nbytes + BUFFER_COUNT * BUFFER_BYTES
    available = psutil.virtual_memory().available
    if host > available:
        raise InvalidArgument(
            f"--size {size} needs about {describe_size(host)} of free memory ({HOST_COPIES} copies of the weights and "
            f"the read buffers) but {describe_size(available)} is available: ask for a smaller size"
        )
    shm_free, _ = segments.free_space()
    if nbytes + PAGE > shm_free:
        raise InvalidArgument(
            f"--size {size} needs {describe_size(nbytes)} of shared memory for the snapshot but /dev/shm has "
            f"{describe_size(shm_free)} free: ask for a smaller size or make /dev/shm larger"
        )
    workdir = Path(tempfile.gettempdir())
    disk_free = shutil.disk_usage(workdir).free
    if 2 * nbytes > disk_free:
        raise InvalidArgument(
            f"--size {size} needs {describe_size(2 * nbytes)} in {workdir} for the model's files but {describe_size(disk_free)} "
            "is free: ask for a smaller size or point TMPDIR elsewhere"
        )
    from ..cuda import devices
    from .. import runtime

    backend = runtime.choose_backend()
    device = devices.discover(backend)[0]
    # On the device at once: the warm worker's copy, a cold call's (each on half the GPU), the
    # process pool's and a fork-per-call child's.
    if backend == "cuda" and device.total_memory and DEVICE_COPIES * nbytes >= device.total_memory:
        raise InvalidArgument(
            f"--size {size} needs {DEVICE_COPIES} copies on {device.name} ({describe_size(device.total_memory)}) "
            "at once: ask for a smaller size"
        )
    return Plan(layers, width, repeat, backend, device.name, workdir, target)
