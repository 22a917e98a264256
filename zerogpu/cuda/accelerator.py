"""torch.accelerator's answers while patched: the emulated GPUs are the machine's accelerator.

Libraries ask torch.accelerator, not torch.cuda, which device to use:
diffusers' enable_model_cpu_offload, transformers' and accelerate's
device_map="auto". Its C++ side knows no emulation, so its functions answer
from the emulated devices instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.accelerator
import torch.accelerator.memory

from . import memory_stats, streams
from .emulated_devices import current_index, device_index, info, set_current_index


def is_available() -> bool:
    return True


def device_count() -> int:
    return info().count


def current_accelerator(check_available: bool = False) -> torch.device:
    return _CUDA


def current_device_index() -> int:
    return current_index()


def set_device_index(device: object, /) -> None:
    set_current_index(device_index(device))


def get_device_capability(device: object = None, /) -> dict[str, Any]:
    device_index(device)
    return {"supported_dtypes": [torch.float32, torch.float16, torch.bfloat16, torch.float64]}


def synchronize(device: object = None, /) -> None:
    device_index(device)


def empty_cache() -> None:
    return None


def get_memory_info(device: object = None, /) -> tuple[int, int]:
    return memory_stats.mem_get_info(device)


_CUDA = torch.device("cuda")

# torch.accelerator (and torch.accelerator.memory) functions, by name.
ACCELERATOR_FUNCTIONS: dict[str, Callable] = {
    "is_available": is_available,
    "device_count": device_count,
    "current_accelerator": current_accelerator,
    "current_device_index": current_device_index,
    "current_device_idx": current_device_index,
    "set_device_index": set_device_index,
    "set_device_idx": set_device_index,
    "get_device_capability": get_device_capability,
    "synchronize": synchronize,
    "current_stream": streams.current_stream,
    "set_stream": streams.set_stream,
    "empty_cache": empty_cache,
    "get_memory_info": get_memory_info,
    "memory_allocated": memory_stats.memory_allocated,
    "max_memory_allocated": memory_stats.max_memory_allocated,
    "memory_reserved": memory_stats.memory_allocated,
    "max_memory_reserved": memory_stats.max_memory_allocated,
    "memory_stats": memory_stats.memory_stats,
    "reset_peak_memory_stats": memory_stats.reset_peak_memory_stats,
    "reset_accumulated_memory_stats": memory_stats.reset_accumulated_memory_stats,
}
ACCELERATOR_MODULES = (torch.accelerator, torch.accelerator.memory)
