"""torch.cuda's memory statistics on the emulated device: the bytes its live tensors hold.

The registry counts the storages of marked tensors as they are made and
freed (registry.StorageAccounts); these functions answer torch.cuda's
memory queries from those counts. There is no caching allocator, so what is
reserved is what is allocated.
"""

from __future__ import annotations

import collections
from typing import Any

from .emulated_devices import device_index, info
from .registry import marked


def memory_allocated(device: object = None) -> int:
    return marked.memory.allocated.get(device_index(device), 0)


def max_memory_allocated(device: object = None) -> int:
    return marked.memory.peak.get(device_index(device), 0)


def reset_peak_memory_stats(device: object = None) -> None:
    marked.memory.reset_peak(device_index(device))


def reset_accumulated_memory_stats(device: object = None) -> None:
    device_index(device)


def mem_get_info(device: object = None) -> tuple[int, int]:
    """(free, total): free is total less what the emulated tensors on that device hold."""
    total = info().total_memory
    return max(total - memory_allocated(device), 0), total


def memory_stats(device: object = None) -> dict[str, Any]:
    """The statistics torch.cuda.memory_stats() reports that have a meaning here, under torch's keys."""
    index = device_index(device)
    current = marked.memory.allocated.get(index, 0)
    peak = marked.memory.peak.get(index, 0)
    stats: dict[str, Any] = {}
    for kind in ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes"):
        for pool in ("all", "small_pool", "large_pool"):
            counted = pool == "all"
            stats[f"{kind}.{pool}.current"] = current if counted else 0
            stats[f"{kind}.{pool}.peak"] = peak if counted else 0
    stats["num_alloc_retries"] = 0
    stats["num_ooms"] = 0
    return collections.OrderedDict(sorted(stats.items()))


def memory_summary(device: object = None, abbreviated: bool = False) -> str:
    index = device_index(device)
    return (
        f"zerogpu emulated cuda:{index}: {memory_allocated(index)} bytes allocated, "
        f"{max_memory_allocated(index)} bytes at the peak, {info().total_memory} bytes in all"
    )


MEMORY_FUNCTIONS = {
    "memory_allocated": memory_allocated,
    "max_memory_allocated": max_memory_allocated,
    "memory_reserved": memory_allocated,
    "max_memory_reserved": max_memory_allocated,
    "reset_peak_memory_stats": reset_peak_memory_stats,
    "reset_max_memory_allocated": reset_peak_memory_stats,
    "reset_max_memory_cached": reset_peak_memory_stats,
    "reset_accumulated_memory_stats": reset_accumulated_memory_stats,
    "memory_stats": memory_stats,
    "memory_summary": memory_summary,
    "mem_get_info": mem_get_info,
}
