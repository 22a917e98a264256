"""The emulated machine: what its GPUs report, which one torch is patched for, device arguments.

This module holds the emulation's state: the DeviceInfo torch is patched for
(per process) and each thread's current device (per thread, as torch's own
is). The rest of the emulation reads it from here; only
zerogpu.cuda.emulation's patch() and unpatch() change the DeviceInfo.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import torch

from ..errors import InvalidArgument

@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the `torch.cuda` queries report while torch is patched."""

    name: str = "zerogpu emulated GPU"
    total_memory: int = 80 * 2**30
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"DeviceInfo.name must be a non-empty string, not {self.name!r}")
        for field, least in (
            ("total_memory", 1),
            ("major", 0),
            ("minor", 0),
            ("multi_processor_count", 1),
            ("count", 1),
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidArgument(
                    f"DeviceInfo.{field} must be an integer of at least {least}, not {value!r}"
                )


# The DeviceInfo while patched, None otherwise; the function mode reads it on every call.
patched: DeviceInfo | None = None
# Per thread: the emulated current device (torch's is per thread too) and
# whether the thread is in emulation.suspended().
_thread = threading.local()
_cuda_devices: dict[int, torch.device] = {}


def set_patched(device: DeviceInfo | None) -> None:
    """Record the DeviceInfo torch is now patched for (None: unpatched)."""
    global patched
    patched = device


def device_count() -> int:
    """How many GPUs the emulated machine has, patched or not."""
    return patched.count if patched is not None else DeviceInfo().count


def info() -> DeviceInfo:
    """The DeviceInfo of the patch; the patched functions run only while there is one."""
    assert patched is not None, "zerogpu.cuda.emulation: torch is not patched"
    return patched


def current_index() -> int:
    return getattr(_thread, "index", 0)


def set_current_index(index: int) -> None:
    _thread.index = index


def forget_current_index() -> None:
    """Back to cuda:0 for this thread, as a process that was never patched."""
    vars(_thread).pop("index", None)


def is_suspended() -> bool:
    """Whether this thread runs inside emulation.suspended()."""
    return getattr(_thread, "suspended", False)


def set_suspended(suspended: bool) -> None:
    _thread.suspended = suspended


# --- device arguments -------------------------------------------------------


def cuda_device(index: int) -> torch.device:
    device = _cuda_devices.get(index)
    if device is None:
        device = _cuda_devices[index] = torch.device("cuda", index)
    return device


def check_ordinal(index: int) -> int:
    count = patched.count if patched is not None else 1
    if not 0 <= index < count:
        raise RuntimeError(
            f"CUDA error: invalid device ordinal: cuda:{index} was requested, but the emulated "
            f"machine has {count} GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"
        )
    return index


@functools.lru_cache(maxsize=256)
def _parse_device(text: str) -> torch.device:
    return torch.device(text)


def is_device_argument(value: object) -> bool:
    return isinstance(value, (str, torch.device)) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def cuda_target(device: object) -> int | None:
    """The emulated cuda index a device argument names, or None for any other device.

    A bare integer means a CUDA ordinal, as it does in a CUDA build of torch;
    torch itself would resolve it through the accelerator (a driver query).
    """
    if isinstance(device, str):
        device = _parse_device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        index = device.index
        return current_index() if index is None else check_ordinal(index)
    if isinstance(device, int) and not isinstance(device, bool):
        return check_ordinal(device)
    return None


def device_index(device: object) -> int:
    """A `torch.cuda` function's device argument as an index, validated like torch does."""
    if device is None:
        return current_index()
    if isinstance(device, torch.cuda.device):
        index = device.idx
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        if isinstance(device, str):
            device = torch.device(device)
        if not isinstance(device, torch.device):
            raise ValueError(f"Expected a torch.device or an integer, but got: {device!r}")
        if device.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        index = current_index() if device.index is None else device.index
    count = info().count
    if not 0 <= index < count:
        raise AssertionError(f"Invalid device id {index}: the emulated machine has {count} GPU(s)")
    return index
