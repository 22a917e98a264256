"""The torch.cuda answers: what torch.cuda's queries say while torch is patched.

`torch.cuda` queries answer from the patch's DeviceInfo, and anything that
would still initialize CUDA raises CudaInitialized naming the call. The
tables here say which torch.cuda functions are answered or wrapped, and in
which of torch's modules they are bound.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from typing import Callable, NoReturn

import torch
import torch.cuda.memory
import torch.cuda.random
import torch.cuda.streams

from ..errors import CudaInitialized
from .compiling import in_compiled_code
from .generators import RANDOM_FUNCTIONS
from .memory_stats import MEMORY_FUNCTIONS
from .streams import STREAM_FUNCTIONS
from .emulated_devices import current_index, device_index, info, is_suspended, set_current_index
from .torch_mode import entered_in_this_thread, mode_active


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What `torch.cuda.get_device_properties` returns while torch is patched."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    # What torch's compilers ask besides (inductor, triton's heuristics): an
    # H100's answers, as the emulated device reports compute capability 9.0.
    gcnArchName: str = "NVIDIA emulated"
    warp_size: int = 32
    is_integrated: bool = False
    is_multi_gpu_board: bool = False
    max_threads_per_multi_processor: int = 2048
    regs_per_multiprocessor: int = 65536
    shared_memory_per_block: int = 49152
    shared_memory_per_block_optin: int = 232448
    shared_memory_per_multiprocessor: int = 233472
    L2_cache_size: int = 50 * 2**20
    uuid: str = "00000000-0000-0000-0000-000000000000"


def _caller() -> str:
    """The torch call that reached us and where user code made it."""
    frame = sys._getframe(1).f_back
    call = None
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        module = frame.f_globals.get("__name__", "?")
        name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        call = f"{module}.{name}()"
        frame = frame.f_back
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "unknown"
    return f"{call or 'a torch operation'} (called at {where})"


_LIBRARY_DIRECTORIES = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(__file__) + os.sep,
)


def _is_library_file(filename: str) -> bool:
    return filename.startswith(_LIBRARY_DIRECTORIES)


def refuse_cuda_init(*args: object, **kwargs: object) -> NoReturn:
    call = _caller()
    hint = ""
    if not mode_active() and not is_suspended() and not entered_in_this_thread():
        hint = (
            f" This thread ({threading.current_thread().name}) was started before zerogpu "
            "patched torch, so the emulation is not active in it: enable zerogpu before "
            "starting threads."
        )
    if in_compiled_code():
        hint += (
            " This call was made in code compiled with torch.compile, which runs on the emulated "
            "device as plain CPU code: take devices from the inputs (x.device) rather than naming 'cuda'."
        )
    raise CudaInitialized(
        f"{call} would initialize CUDA in a process where zerogpu emulates it, and zerogpu "
        "does not emulate this call. The app's main process must never create a CUDA "
        "context (its forked workers could not use the GPU): move this call into a function "
        f"decorated with @zerogpu.GPU.{hint}"
    )


def _is_available() -> bool:
    return True


def _device_count() -> int:
    return info().count


def _current_device() -> int:
    return current_index()


def _set_device(device: object) -> None:
    if isinstance(device, int) and device < 0:
        return
    set_current_index(device_index(device))


def _exchange_device(device: int) -> int:
    if device < 0:
        return -1
    previous = current_index()
    set_current_index(device_index(device))
    return previous


def _get_device_properties(device: object = None) -> DeviceProperties:
    device_index(device)
    emulated = info()
    return DeviceProperties(
        name=emulated.name,
        major=emulated.major,
        minor=emulated.minor,
        total_memory=emulated.total_memory,
        multi_processor_count=emulated.multi_processor_count,
    )


def _get_device_name(device: object = None) -> str:
    return _get_device_properties(device).name


def _get_device_capability(device: object = None) -> tuple[int, int]:
    properties = _get_device_properties(device)
    return properties.major, properties.minor


def _synchronize(device: object = None) -> None:
    device_index(device)


def _empty_cache() -> None:
    return None


def _set_per_process_memory_fraction(fraction: float, device: object = None) -> None:
    device_index(device)
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if fraction < 0 or fraction > 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")


def _seeding_emulated(original: Callable) -> Callable:
    # Emulated cuda tensors draw from the CPU generator; torch's own seeding of
    # the real generators stays queued until a worker initializes CUDA.
    @functools.wraps(original)
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))
        original(seed)

    return manual_seed


# torch.cuda functions answered from the DeviceInfo, by name, and those wrapped
# (made from torch's own). Each is replaced wherever torch binds it: torch.cuda
# re-exports torch.cuda.memory's and torch.cuda.random's functions.
CUDA_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "manual_seed": _seeding_emulated,
    "manual_seed_all": _seeding_emulated,
}
CUDA_FUNCTIONS: dict[str, Callable] = {
    "_lazy_init": refuse_cuda_init,
    "is_available": _is_available,
    "device_count": _device_count,
    "current_device": _current_device,
    "set_device": _set_device,
    "_exchange_device": _exchange_device,
    "_maybe_exchange_device": _exchange_device,
    "get_device_name": _get_device_name,
    "get_device_properties": _get_device_properties,
    "get_device_capability": _get_device_capability,
    "synchronize": _synchronize,
    "empty_cache": _empty_cache,
    "set_per_process_memory_fraction": _set_per_process_memory_fraction,
    **MEMORY_FUNCTIONS,
    **RANDOM_FUNCTIONS,
    **STREAM_FUNCTIONS,
}
CUDA_MODULES = (torch.cuda, torch.cuda.memory, torch.cuda.random, torch.cuda.streams)
