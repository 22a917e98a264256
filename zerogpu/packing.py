"""Step 1, pack (once): the recorded 'cuda' tensors become one shared-memory snapshot.

After packing, every recorded tensor's data is a view of the snapshot, so the
weights exist once in host memory and a forked worker inherits them for free.
"""

from __future__ import annotations

import ctypes
import gc
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import emulation
from .snapshot import Snapshot


@dataclass
class PackedModel:
    """A snapshot and, for each of its entries, the tensor objects that hold it."""

    snapshot: Snapshot
    bindings: dict[str, list[weakref.ref]] = field(default_factory=dict)

    def live_tensors(self) -> list[torch.Tensor]:
        return [t for refs in self.bindings.values() for ref in refs if (t := ref()) is not None]

    def rebind(self, views: dict[str, torch.Tensor], *, keep_mark: bool = True) -> None:
        """Point every bound tensor at its view in `views` (host or device memory)."""
        for name, refs in self.bindings.items():
            for ref in refs:
                tensor = ref()
                if tensor is not None:
                    emulation.rebind(tensor, views[name], mark=keep_mark)

    @property
    def nbytes(self) -> int:
        return self.snapshot.nbytes

    def close(self) -> None:
        self.snapshot.close()


def pack(tensors: list[torch.Tensor], progress: Callable[[int], None] | None = None) -> PackedModel | None:
    """Pack `tensors` into one snapshot and make each of them a view of it.

    Returns None when there is nothing to pack. Distinct tensor objects that
    share a storage (tied weights, views) stay sharing it.
    """
    if not tensors:
        return None
    names = {f"t{i}": tensor for i, tensor in enumerate(tensors)}
    with emulation.suspended():
        snapshot = Snapshot.pack({name: t.data for name, t in names.items()}, progress=progress)
    model = PackedModel(snapshot, {name: [weakref.ref(t)] for name, t in names.items()})
    model.rebind(snapshot.tensors(), keep_mark=True)
    del names
    give_back_freed_memory()
    return model


def give_back_freed_memory() -> None:
    """Return the weights' old pages to the system, so they are not kept twice.

    glibc raises its mmap threshold as large blocks are freed, so a model's
    tensors often live in the heap, and freeing them keeps their pages in the
    process. malloc_trim gives them back (Python has no binding for it).
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator returns large blocks by itself
