"""Step 1, pack (once): the recorded 'cuda' tensors become one shared-memory snapshot.

After packing, every recorded tensor's data is a view of the snapshot, so the
weights exist once in host memory and a forked worker inherits them for free.
"""

from __future__ import annotations

import ctypes
import gc
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..cuda import emulation
from ..cuda import registry
from ..cuda.registry import collector_paused
from ..errors import SerializationError
from .snapshot import Snapshot


# Puts tensors' version counters back, all in one call (torch 2.4 and later); without it a
# rebind goes through a view for every tensor.
set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
try:
    if set_versions is not None:
        set_versions((), ())
except TypeError:  # the one-tensor form of older releases
    set_versions = None


@dataclass
class PackedModel:
    """A snapshot and, for each of its entries, the tensor object that holds it."""

    snapshot: Snapshot
    bindings: dict[str, weakref.ref] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # id of each bound tensor: its entry
    # Bound tensors still alive, kept by their weak references' callbacks so
    # that asking before each call costs nothing however large the model.
    held: int = 0

    def bind(self, name: str, tensor: torch.Tensor) -> None:
        self.bindings[name] = weakref.ref(tensor, self._lost)
        self.names[id(tensor)] = name
        self.held += 1

    def _lost(self, _: weakref.ref) -> None:
        self.held -= 1

    def live_tensors(self) -> list[torch.Tensor]:
        return [t for ref in self.bindings.values() if (t := ref()) is not None]

    def name_of(self, tensor: torch.Tensor) -> str | None:
        """The entry `tensor` holds, if it is one of this model's tensors."""
        name = self.names.get(id(tensor))
        return name if name is not None and self.bindings[name]() is tensor else None

    def rebind(self, buffer: torch.Tensor, *, keep_mark: bool = True) -> None:
        """Point every bound tensor at its place in `buffer`, the snapshot's data region in
        host or device memory (see Snapshot.views).

        Where the device stays the same, in place with `set_`: no tensor is made per entry,
        which for a model of thousands of tensors is most of a worker's restore. `set_`
        counts as a write, which `.data =` does not, so each tensor's version is put back
        after: autograd would otherwise refuse graphs and no_grad views made before.
        """
        snapshot = self.snapshot
        storages = snapshot.storages(buffer)
        device = buffer.device
        in_place = set_versions is not None
        set_data = torch.Tensor.data.__set__
        rebound: list[tuple[torch.Tensor, torch.UntypedStorage]] = []
        moved, versions = [], []
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad(), collector_paused():
                for entry, storage in zip(snapshot.entries, storages):
                    tensor = self.bindings[entry.name]()
                    if tensor is None:
                        continue
                    if in_place and tensor.device == device:
                        try:
                            version = tensor._version
                            tensor.set_(storage, entry.storage_offset, entry.shape, entry.stride)
                            moved.append(tensor)
                            versions.append(version)
                            rebound.append((tensor, storage))
                            continue
                        except RuntimeError:
                            pass  # e.g. a tensor made under inference_mode: it has no version to keep
                    set_data(tensor, entry.over(storage, device))
                    rebound.append((tensor, storage))
        finally:
            # Whatever stopped the loop, the tensors it moved are counted where they now are.
            if moved:
                set_versions(moved, versions)
            registry.recount(rebound, mark=keep_mark)

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
    with collector_paused():
        named = {f"t{i}": tensor for i, tensor in enumerate(tensors)}
        with emulation.suspended():
            # Workers are forked from this process and inherit the mapping; nobody attaches it by
            # name. Without one, a process killed by SIGKILL (or a container stopped hard), even
            # while packing, leaves nothing in /dev/shm.
            snapshot = Snapshot.pack({name: t.data for name, t in named.items()}, progress=progress, named=False)
        model = PackedModel(snapshot)
        for name, tensor in named.items():
            model.bind(name, tensor)
        model.rebind(snapshot.region(), keep_mark=True)
        del named
    give_back_freed_memory()
    return model


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes a snapshot of `tensors` copies: each storage once, however many tensors share it."""
    sizes: dict[int, int] = {}
    with torch._C.DisableTorchFunction():  # the emulation's function mode would see every call
        for tensor in tensors:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            sizes[pointer] = max(sizes.get(pointer, 0), storage.nbytes())
    return sum(sizes.values())


def unpacked(models: list[PackedModel]) -> list[torch.Tensor]:
    """Live 'cuda' tensors that none of `models` holds: moved to 'cuda' after they were packed."""
    return [t for t in emulation.live_tensors() if not any(m.name_of(t) is not None for m in models)]


class References:
    """Packed tensors travel to a worker by name: it holds them already, restored.

    `models` gives the packed models of this process (the caller's, or in a
    worker the ones it restored, which are the same objects).
    """

    def __init__(self, models: Callable[[], list[PackedModel]]) -> None:
        self.models = models

    def key_of(self, tensor: torch.Tensor) -> Hashable | None:
        for model in self.models():
            name = model.name_of(tensor)
            if name is not None:
                return model.snapshot.name, name
        return None

    def resolve(self, key: Hashable) -> torch.Tensor:
        snapshot, name = key
        for model in self.models():
            if model.snapshot.name == snapshot:
                tensor = model.bindings[name]()
                if tensor is not None:
                    return tensor
        raise SerializationError(f"the packed tensor {name} of {snapshot} is not in this worker")


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
