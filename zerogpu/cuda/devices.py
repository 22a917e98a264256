"""Which GPUs this process may schedule, found without creating a CUDA context.

Only children touch CUDA, so the parent asks NVML (nvidia-ml-py, when it is
installed) or, failing that, the driver's files under /proc. Both list GPUs in
PCI bus order; CUDA_VISIBLE_DEVICES then picks and orders them as CUDA would
(with CUDA_DEVICE_ORDER=PCI_BUS_ID). Each Device carries the GPU's UUID as
`visible_id`, which a child puts in its own CUDA_VISIBLE_DEVICES: a UUID names
the same GPU whatever order CUDA enumerates in.

The driver is asked once per process (enable(), choosing the backend and the
scheduler all need the answer): the machine's GPUs do not change while it
runs. CUDA_VISIBLE_DEVICES and the ZEROGPU_* settings are read at every
call, so a change to them is seen at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from .. import settings
from ..errors import InvalidArgument

PROC_GPUS = Path("/proc/driver/nvidia/gpus")

_machine: list[PhysicalGpu] | None = None  # what the driver said, once asked
_machine_lock = threading.Lock()


@dataclass(frozen=True)
class Device:
    """One GPU the scheduler hands out.

    `index` is its place among the devices of this node (0, 1, ...);
    `visible_id` is what a child puts in CUDA_VISIBLE_DEVICES to see it alone;
    `total_memory` is in bytes (0 when the driver does not say).
    """

    index: int
    visible_id: str
    name: str
    total_memory: int
    backend: str


@dataclass(frozen=True)
class PhysicalGpu:
    """A GPU as the driver lists it, before CUDA_VISIBLE_DEVICES is applied."""

    uuid: str
    name: str
    total_memory: int


def discover(backend: str | None = None) -> list[Device]:
    """The devices of this node for `backend` ('cuda' or 'emulated').

    With no backend given, zerogpu.settings.backend() decides, else 'cuda'
    when a GPU is visible and 'emulated' otherwise. Never creates a CUDA context.
    """
    chosen = backend or settings.backend() or ("cuda" if gpu_visible() else "emulated")
    if chosen not in settings.BACKENDS:
        raise InvalidArgument(f"backend {chosen!r} is unknown: use 'cuda' or 'emulated'")
    if chosen == "emulated":
        return emulated_devices(settings.emulated_gpus())
    gpus = select_visible(machine_gpus(), settings.cuda_visible_devices())
    return [
        Device(index, gpu.uuid, gpu.name, gpu.total_memory, "cuda")
        for index, gpu in enumerate(gpus)
    ]


def gpu_visible() -> bool:
    """Whether this process may use at least one real NVIDIA GPU."""
    return bool(select_visible(machine_gpus(), settings.cuda_visible_devices()))


def machine_gpus() -> list[PhysicalGpu]:
    """physical_gpus(), asked of the driver at the first call only."""
    global _machine
    with _machine_lock:
        if _machine is None:
            _machine = physical_gpus()
        return list(_machine)


def forget() -> None:
    """Ask the driver again at the next discovery."""
    global _machine
    with _machine_lock:
        _machine = None


def emulated_devices(count: int) -> list[Device]:
    """`count` emulated devices sharing the host's memory between them."""
    if count < 1:
        raise InvalidArgument(f"the emulated backend needs at least 1 device, not {count}")
    # Host memory stands in for device memory: split it so that the devices
    # together never promise more than the machine has.
    memory = psutil.virtual_memory().total // count
    return [Device(i, str(i), f"Emulated GPU {i}", memory, "emulated") for i in range(count)]


def physical_gpus() -> list[PhysicalGpu]:
    """Every NVIDIA GPU of the machine in PCI bus order: NVML when present, else /proc."""
    found = nvml_gpus()
    return found if found is not None else proc_gpus()


def nvml_gpus() -> list[PhysicalGpu] | None:
    """The GPUs NVML reports; None when nvidia-ml-py or the NVML library is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(PhysicalGpu(
                uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
                name=text(pynvml.nvmlDeviceGetName(handle)),
                total_memory=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            ))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def proc_gpus(root: Path = PROC_GPUS) -> list[PhysicalGpu]:
    """The GPUs the driver lists under /proc (one folder per PCI bus id); memory unknown."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    gpus = []
    for folder in folders:
        try:
            fields = parse_information((folder / "information").read_text())
        except OSError:
            continue
        uuid = fields.get("GPU UUID", "")
        if uuid:
            gpus.append(PhysicalGpu(uuid, fields.get("Model", "NVIDIA GPU"), 0))
    return gpus


def parse_information(text: str) -> dict[str, str]:
    """The 'Key: value' lines of a driver information file."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def select_visible(gpus: list[PhysicalGpu], visible: str | None) -> list[PhysicalGpu]:
    """The GPUs CUDA_VISIBLE_DEVICES lets through, in its order.

    Entries are indices or GPU UUIDs (a unique prefix is enough). Like CUDA,
    the list ends at the first entry that names no GPU or one already named.
    """
    if visible is None:
        return list(gpus)
    chosen: list[PhysicalGpu] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.startswith("MIG-"):
            raise InvalidArgument(
                f"CUDA_VISIBLE_DEVICES names the MIG instance {entry}; zerogpu schedules whole "
                "GPUs only: name GPUs by index or GPU-UUID"
            )
        gpu = find_gpu(gpus, entry)
        if gpu is None or gpu in chosen:
            break
        chosen.append(gpu)
    return chosen


def find_gpu(gpus: list[PhysicalGpu], entry: str) -> PhysicalGpu | None:
    if entry.isdigit():
        index = int(entry)
        return gpus[index] if index < len(gpus) else None
    if entry.startswith("GPU-"):
        matches = [gpu for gpu in gpus if gpu.uuid.startswith(entry)]
        return matches[0] if len(matches) == 1 else None
    return None


def text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value
