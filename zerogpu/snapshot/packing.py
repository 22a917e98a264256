"""Step 1, pack (once): the recorded 'cuda' tensors become one shared-memory snapshot.

After packing, every recorded tensor's data is a view of the snapshot, so the
weights exist once in host memory and a forked worker inherits them for free.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import gc
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..cuda import emulated_devices, emulation
from ..cuda import registry
from ..cuda.registry import collector_paused
from ..errors import SerializationError
from .manifest import Entry
from .snapshot import Snapshot


# Puts tensors' version counters back, all in one call (torch 2.4 and later); without it a
# rebind goes through a view for every tensor.
set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
try:
    if set_versions is not None:
        set_versions((), ())
except TypeError:  # the one-tensor form of older releases
    set_versions = None

# Gives one tensor object another's TensorImpl (torch 2.3 and later). The public
# torch.utils.swap_tensors refuses tensors with Python weak references, which every packed
# one has (PackedModel.bindings), so `renewable` makes its other checks here. This one
# still refuses an impl with C++ weak references (the profiler's, say): `rebind` then
# moves that tensor in place instead.
swap_impl = getattr(torch._C, "_swap_tensor_impl", None)
plain_dispatch = torch._C._disabled_torch_dispatch_impl


def renewable(tensor: torch.Tensor) -> bool:
    """Whether `tensor` can take a new TensorImpl with nothing lost: nothing else holds
    its current one (a view of it, an autograd graph), and nothing a user sees lives on that
    impl but its data, requires_grad and version, which the swap carries over. (Its version
    counter's identity lives there too: `rebind` renews only tensors that share no storage,
    hence no counter. A forward-mode tangent, given outside any dual level, is not looked
    for: none is left once the level ends.)"""
    return (swap_impl is not None and tensor._use_count() == 1 and tensor.grad_fn is None
            and not tensor._is_view() and tensor.grad is None and tensor._backward_hooks is None
            and getattr(tensor, "_post_accumulate_grad_hooks", None) is None
            and tensor.layout == torch.strided and not tensor.is_inference()
            and not tensor.is_conj() and not tensor.is_neg() and not any(getattr(tensor, "names", ()))
            and type(tensor).__torch_dispatch__ is plain_dispatch)


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

    @functools.cached_property
    def refs(self) -> list[weakref.ref]:
        """The binding of each entry, in the snapshot's order: made once, when packing, so
        that a worker's rebind looks up no names (each look-up writes to the name's refcount,
        on a page the worker then copies)."""
        return [self.bindings[entry.name] for entry in self.snapshot.entries]

    def live_tensors(self) -> list[torch.Tensor]:
        return [t for ref in self.bindings.values() if (t := ref()) is not None]

    def name_of(self, tensor: torch.Tensor) -> str | None:
        """The entry `tensor` holds, if it is one of this model's tensors."""
        name = self.names.get(id(tensor))
        return name if name is not None and self.bindings[name]() is tensor else None

    def rebind(self, buffer: torch.Tensor, *, keep_mark: bool = True, renew: bool = False) -> None:
        """Point every bound tensor at its place in `buffer`, the snapshot's data region in
        host or device memory (see Snapshot.views).

        Where the device stays the same, in place with `set_`: no tensor is made per entry,
        which for a model of thousands of tensors is most of a worker's restore. `set_`
        counts as a write, which `.data =` does not, so each tensor's version is put back
        after: autograd would otherwise refuse graphs and no_grad views made before.

        With renew (once, when packing), each tensor that allows it gets a new TensorImpl
        instead, all of them made in one run: a model's impls then lie together in a few
        pages rather than one page each among everything else the process allocated, and
        every worker's rebind, which writes to each, copies those few pages on write (about
        5 us each) instead of thousands.
        """
        snapshot = self.snapshot
        storages = snapshot.storages(buffer)
        device = buffer.device
        in_place = set_versions is not None
        set_data = torch.Tensor.data.__set__
        rebound: list[tuple[torch.Tensor, torch.UntypedStorage]] = []
        moved, versions = [], []
        renewed: list[tuple[torch.Tensor, torch.Tensor, torch.UntypedStorage, Entry]] = []
        # Tensors that share a storage (tied weights, a Parameter and the tensor it wraps) may
        # share a version counter too, which autograd relies on to see a write through one of
        # them; a new impl would have a counter of its own, so only a storage's sole tensor
        # is renewed.
        sharers = collections.Counter(map(id, storages)) if renew else None
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad(), collector_paused():
                for ref, entry, storage in zip(self.refs, snapshot.entries, storages):
                    tensor = ref()
                    if tensor is None:
                        continue
                    if in_place and tensor.device == device:
                        if renew and sharers[id(storage)] == 1 and renewable(tensor):
                            renewed.append((tensor, entry.over(storage, device), storage, entry))
                            continue
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
                for tensor, fresh, storage, entry in renewed:
                    version = tensor._version
                    try:
                        fresh.requires_grad_(tensor.requires_grad)
                        swap_impl(tensor, fresh)
                    except RuntimeError:  # a C++ weak reference holds its impl: see swap_impl
                        tensor.set_(storage, entry.storage_offset, entry.shape, entry.stride)
                    moved.append(tensor)
                    versions.append(version)
                    rebound.append((tensor, storage))
        finally:
            # Whatever stopped the loop, the tensors it moved are counted where they now are.
            if moved:
                set_versions(moved, versions)
            registry.recount(rebound, mark=keep_mark)
            # The replaced impls go here, after all the new ones were made, so that none of
            # the new ones takes a place one of them leaves.
            renewed.clear()

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
        # On a thread of its own: glibc gives a new thread a malloc arena of its own (or,
        # past MALLOC_ARENA_MAX, one it shares), so the new impls (see rebind) are laid out
        # together there rather than in the holes this process's main heap has from every
        # tensor it freed since it started. Only their placement depends on it.
        device = emulated_devices.current_index()  # the caller's, which is kept per thread

        def renew() -> None:
            emulated_devices.set_current_index(device)
            model.rebind(snapshot.region(), keep_mark=True, renew=True)

        run_on_new_thread(renew)
        del named
    give_back_freed_memory()
    return model


def run_on_new_thread(job: Callable[[], None]) -> None:
    """Run `job` on a new thread and wait for it; raise its error, if it had one."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="zerogpu-pack", daemon=True).start()
    try:
        done.wait()
    except BaseException:
        # Interrupted (Ctrl-C), however many times: the tensors are still moving, so wait
        # for the job to end before the caller goes on. (On an Event: Thread.join, once
        # interrupted, no longer waits.)
        while not done.is_set():
            try:
                done.wait()
            except BaseException:  # noqa: BLE001 - the first interrupt is the one raised
                pass
        raise
    if errors:
        raise errors[0]


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
