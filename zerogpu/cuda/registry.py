"""The tensor registry: which tensors are emulated cuda, and on which device.

Being "on cuda" is a mark kept beside the tensor (its Python object, weakly
held), not a tensor subclass: the data stays in the tensor itself, so the
runtime can rebind it (`rebind`) to a view of shared memory or of a restored
device buffer.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import Iterable, Iterator

import torch

from ..errors import InvalidArgument
from . import emulated_devices


class Registry:
    """The emulated-cuda tensors and their device index, held weakly.

    Written by hand rather than with torch.utils.weak.WeakTensorKeyDictionary:
    that class wraps every looked-up key in a weak reference whose comparison
    runs in Python (about 2.5 us a hit), and the registry is asked once per
    tensor argument of every torch call. A dict keyed by id() answers in about
    0.15 us; each entry keeps a weak reference whose callback removes it when
    the tensor is freed, and a lookup checks that reference so a reused id can
    never answer for a dead tensor.
    """

    def __init__(self, memory: "StorageAccounts | None" = None) -> None:
        self._entries: dict[int, tuple[weakref.ref, int]] = {}
        self.added = 0  # entries ever made: a count that only grows
        self.memory = memory if memory is not None else StorageAccounts()

    def index(self, tensor: torch.Tensor) -> int | None:
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def set(self, tensor: torch.Tensor, index: int) -> None:
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            if entry[1] != index:
                self.memory.forget(key)
                self.memory.count(key, tensor, index)
                self._entries[key] = (entry[0], index)
            return
        self._entries[key] = (weakref.ref(tensor, functools.partial(self._forget, key)), index)
        self.memory.count(key, tensor, index)
        self.added += 1

    def moved(self, tensor: torch.Tensor) -> None:
        """Count a marked tensor's memory again: its data now lives in another storage."""
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            self.memory.forget(key)
            self.memory.count(key, tensor, entry[1])

    def recount(self, placed: Iterable[tuple[torch.Tensor, torch.UntypedStorage]], index: int) -> None:
        """After each tensor's data moved to the storage beside it (which must be the
        tensor's own storage now: it is not asked again): count it there, marking those not
        marked yet on device `index` (`set` then `moved`, one lookup each)."""
        entries = self._entries
        moves, unmarked = [], []
        for tensor, storage in placed:
            key = id(tensor)
            entry = entries.get(key)
            if entry is None or entry[0]() is not tensor:
                unmarked.append(tensor)
                continue
            moves.append((key, storage, entry[1]))
        # The moves first: a tensor marked after them finds its storage counted already,
        # where before them it would count the new storage beside the old (a false peak).
        self.memory.move(moves)
        for tensor in unmarked:
            self.set(tensor, index)

    def discard(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            del self._entries[key]
            self.memory.forget(key)

    def tensors(self) -> list:
        alive = (ref() for ref, _ in list(self._entries.values()))
        return [tensor for tensor in alive if tensor is not None]

    def clear(self) -> None:
        self._entries.clear()
        self.memory.clear()

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]
            self.memory.forget(key)


class StorageAccounts:
    """The bytes each emulated device holds: the storages of its live marked tensors, each once.

    What torch.cuda.memory_allocated() and its peak report. A storage is
    counted while any marked tensor (or emulated storage) holds it, by its
    data pointer; each holder remembers the storage it was counted under, so
    rebinding a tensor to other memory moves its count (Registry.moved).
    """

    def __init__(self) -> None:
        self._holders: dict[int, tuple[int, int]] = {}  # holder id -> (data pointer, device index)
        self._storages: dict[tuple[int, int], list[int]] = {}  # (pointer, index) -> [holders, bytes]
        self.allocated: dict[int, int] = {}
        self.peak: dict[int, int] = {}

    def count(self, holder: int, tensor: torch.Tensor | torch.UntypedStorage, index: int) -> None:
        self.add(holder, *_storage_of(tensor), index)

    def add(self, holder: int, pointer: int, nbytes: int, index: int) -> None:
        """Count `holder` as holding the storage of `nbytes` at `pointer` on device `index`."""
        if not nbytes:
            # An empty storage holds nothing, and may start where another one does (a snapshot
            # places it at the next storage's offset): it must not share that storage's account.
            pointer = 0
        self._holders[holder] = (pointer, index)
        account = self._storages.get((pointer, index))
        if account is not None:
            account[0] += 1
            return
        self._storages[(pointer, index)] = [1, nbytes]
        allocated = self.allocated[index] = self.allocated.get(index, 0) + nbytes
        if allocated > self.peak.get(index, 0):
            self.peak[index] = allocated

    def move(self, moves: list[tuple[int, torch.UntypedStorage, int]]) -> None:
        """Count each (holder, storage, device index) under that storage instead of the one it
        was counted under: `forget` then `add` for each, in one pass that asks each storage
        once (a restore moves thousands of tensors, many of them sharing storages)."""
        holders, accounts, allocated = self._holders, self._storages, self.allocated
        looked: dict[int, tuple[int, int]] = {}
        for holder, storage, index in moves:
            place = holders.get(holder)
            if place is not None:
                account = accounts[place]
                account[0] -= 1
                if not account[0]:
                    del accounts[place]
                    allocated[place[1]] -= account[1]
            extent = looked.get(id(storage))
            if extent is None:
                extent = looked[id(storage)] = (storage.data_ptr(), storage.nbytes())
            pointer, nbytes = extent
            if not nbytes:
                pointer = 0  # as in add: an empty storage shares no other storage's account
            place = holders[holder] = (pointer, index)
            account = accounts.get(place)
            if account is not None:
                account[0] += 1
            else:
                accounts[place] = [1, nbytes]
                allocated[index] = allocated.get(index, 0) + nbytes
        for index in {index for _, _, index in moves}:
            self.peak[index] = max(self.peak.get(index, 0), allocated.get(index, 0))

    def forget(self, holder: int) -> None:
        place = self._holders.pop(holder, None)
        if place is None:
            return
        account = self._storages[place]
        account[0] -= 1
        if not account[0]:
            del self._storages[place]
            self.allocated[place[1]] -= account[1]

    def reset_peak(self, index: int) -> None:
        self.peak[index] = self.allocated.get(index, 0)

    def clear(self) -> None:
        self._holders.clear()
        self._storages.clear()
        self.allocated.clear()
        self.peak.clear()


def _storage_of(tensor: torch.Tensor | torch.UntypedStorage) -> tuple[int, int]:
    """(data pointer, bytes) of a tensor's storage, asked of torch itself, not of the emulation."""
    with torch._C.DisableTorchFunction():
        try:
            storage = tensor if isinstance(tensor, torch.UntypedStorage) else tensor.untyped_storage()
            return storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage: sparse, nested
            return 0, 0


# Every emulated cuda tensor of this process; the function mode asks it on every torch call.
marked = Registry()
# Storages made with UntypedStorage(n, device="cuda"), counted in the same memory.
marked_storages = Registry(marked.memory)


def is_cuda(tensor: object) -> bool:
    """Whether `tensor` is an emulated cuda tensor (recorded in the registry)."""
    return isinstance(tensor, torch.Tensor) and marked.index(tensor) is not None


def _check_emulable(tensor: object, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{what} takes a torch.Tensor, not {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise InvalidArgument(
            f"{what} takes a CPU tensor (an emulated cuda tensor keeps its data on the CPU), "
            f"not one on {tensor.device}"
        )
    return tensor


def mark(tensor: torch.Tensor, index: int = 0) -> None:
    """Record a CPU tensor as emulated cuda on device `index` (default cuda:0)."""
    with torch._C.DisableTorchFunction():
        _check_emulable(tensor, "mark()")
    count = emulated_devices.device_count()
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise InvalidArgument(
            f"mark() got device index {index!r}, but the emulated devices are 0..{count - 1}"
        )
    marked.set(tensor, index)


def unmark(tensor: torch.Tensor) -> None:
    """Make `tensor` a plain CPU tensor again; a tensor that was not marked is left alone."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"unmark() takes a torch.Tensor, not {type(tensor).__name__}")
    marked.discard(tensor)


def rebind(tensor: torch.Tensor, data: torch.Tensor, *, mark: bool | None = None) -> None:
    """`tensor.data = data`, with `tensor` emulated cuda afterwards as the runtime says.

    The runtime rebinds recorded tensors to views of a snapshot or of a
    restored buffer; those views are plain tensors, and a plain `.data =`
    would move the tensor to the CPU as it does in torch. `mark=None` keeps
    `tensor` emulated cuda if it was (or if `data` is); True makes it so
    (`data` must then be a CPU tensor); False makes it a plain tensor, as for
    a worker's real GPU memory.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"rebind() takes a torch.Tensor, not {type(tensor).__name__}")
    if not isinstance(data, torch.Tensor):
        raise InvalidArgument(f"rebind() takes a torch.Tensor as data, not {type(data).__name__}")
    index = marked.index(tensor)
    if index is None:
        index = marked.index(data)
    if mark is None:
        mark = index is not None
    with torch._C.DisableTorchFunction():
        if mark:
            _check_emulable(data, "rebind(mark=True)")
        torch.Tensor.data.__set__(tensor, data)
    if mark:
        marked.set(tensor, index if index is not None else emulated_devices.current_index())
        marked.moved(tensor)
    else:
        marked.discard(tensor)


def recount(placed: Iterable[tuple[torch.Tensor, torch.UntypedStorage]], *, mark: bool) -> None:
    """After the runtime moved each tensor's data to the storage beside it (a restore, a
    pack): with mark, count each there, marking those not marked yet on the current
    device; without, make them plain tensors. `rebind` for thousands at once, its checks
    left out."""
    if not mark:
        for tensor, _ in placed:
            marked.discard(tensor)
        return
    with torch._C.DisableTorchFunction():
        marked.recount(placed, emulated_devices.current_index())


def live_tensors() -> list[torch.Tensor]:
    """Every live emulated cuda tensor, in the order they were first marked."""
    return marked.tensors()


def marks() -> int:
    """How many tensors have been marked so far: unchanged means no tensor became 'cuda' since."""
    return marked.added


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with Python's cyclic garbage collector off.

    Packing or restoring makes a few objects per tensor, none of them in a
    cycle; with the collector on, those allocations set off full collections
    that walk every object of the process, which for a model of 10,000 tensors
    costs more than the work itself.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
