"""What a message between a caller and its worker holds, and how it is made and read.

A message is cloudpickle with one addition: torch tensors. Their bytes travel
beside the pickle, not inside it: small storages inline in the message, large
ones (at least `TENSOR_SHM_THRESHOLD` bytes) in a fresh POSIX shared-memory
segment whose name is all the message carries (see tensor_segments).

Layout of a message (all integers little-endian):

    b"ZGT1" | u32 n | n bytes: pickled table of storages | inline storage bytes | pickle

zerogpu's own small messages ("running", "done", a call's header), which
hold plain data only, are b"ZGP1" | pickle instead: the standard pickler,
without a table, costs a fraction of a cloudpickle one, and every call sends
three of them.

Each table entry is (lo, nbytes, size, name): the bytes [lo, lo + nbytes) of
one storage of the sender, in a buffer of `size` bytes, either inline (name
None) or in the named segment. Tensors in the pickle refer to their entry by
index and keep their byte offset in the sender's storage, so tensors that
shared a storage share one again after `loads()` (see storages).

While zerogpu is enabled, the tensors of its packed models travel by name: a
worker is forked from its caller, so it holds them already, restored onto its
device; an argument that holds them, a decorated method's `self` say, needs
only their names.

From worker to caller, classes and functions of `__main__` travel by name, not
by value as cloudpickle would send them: the caller is the process the worker
was forked from, so it has them, and `except MyError:` there catches the
caller's own class.
"""

from __future__ import annotations

import io
import math
import mmap
import pickle
import struct
import sys
import types
from typing import Any, Hashable

import cloudpickle
import torch

from .. import runtime
from ..errors import SerializationError
from ..snapshot import packing, segments
from .storages import LoadedSpan, StoredSpan, extent, padded, rebuild_tensor
from .tensor_segments import copy_to_segment, map_storage
from .unpicklable import describe_exception, unpicklable

TENSOR_SHM_THRESHOLD = 4 * 2**20
"""Storages of at least this many bytes travel through shared memory."""

MAGIC = b"ZGT1"
PLAIN = b"ZGP1"
PREFIX = struct.Struct("<4sI")
EMULATION_MODULE = "zerogpu.cuda.emulation"

# The packed models' tensors, which both sides of a worker's socket hold.
_PACKED = packing.References(runtime.models)


def _references() -> packing.References | None:
    """Whom to ask for the tensors sent by name: the packed models while zerogpu is enabled."""
    return _PACKED if runtime.is_enabled() else None


def dumps(obj: Any, *, to_device: bool, what: str = "value") -> bytes:
    """Pickle `obj` into a message for the other side of a worker's socket.

    to_device=True (caller -> worker): tensors on cuda (real or emulated) are
    rebuilt on the worker's device. to_device=False (worker -> caller): every
    tensor comes back as a CPU tensor. `what` names `obj` in errors, e.g.
    "arguments['x'] (a _thread.lock) cannot be pickled".

    The message owns the shared-memory segments it names until `loads()`
    unlinks them; a message that will never be loaded is released with
    `discard()`.
    """
    return _dumps(obj, to_device=to_device, what=what, threshold=TENSOR_SHM_THRESHOLD)


def dumps_plain(obj: Any) -> bytes:
    """A message of plain data (strings, numbers, None, and tuples, lists and dicts of them) for `loads`."""
    return PLAIN + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes | bytearray | memoryview | mmap.mmap) -> Any:
    """Rebuild the object of a message made by `dumps` or `dumps_plain`.

    Shared-memory storages are mapped, not copied, and their names unlinked
    before anything else happens, so nothing is left in /dev/shm whatever
    becomes of the message.
    """
    view = memoryview(data).cast("B")
    if view[:4] == PLAIN:
        try:
            return pickle.loads(view[4:])
        except Exception as exc:
            raise SerializationError(f"could not rebuild a message: {describe_exception(exc)}") from exc
    table, offset = _read_table(view)
    storages, offset = _open_storages(table, view, offset)
    body = view[offset:]
    unpickler = _Unpickler(io.BytesIO(body), storages)
    try:
        return unpickler.load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"could not rebuild a message: {describe_exception(exc)}") from exc
    finally:
        # The memo holds the bound find_class result, which holds the unpickler: a cycle
        # that would keep every mapped segment of the message until the collector runs.
        unpickler.memo.clear()
        unpickler.storages = []


def discard(data: bytes | bytearray | memoryview | mmap.mmap) -> None:
    """Release the shared-memory segments of a message that will never be loaded.

    Harmless for a message already loaded: its segments are gone already.
    The caller discards its argument message once the worker is reaped.
    """
    view = memoryview(data).cast("B")
    if view[:4] == PLAIN:
        return
    table, _ = _read_table(view)
    for _, _, _, name in table:
        if name is not None:
            segments.unlink(name)


def segments_of(pid: int) -> list[str]:
    """Names (as posix_ipc takes them) of the message segments process `pid` created."""
    return ["/" + name for name in segments.names_of(pid, "msg")]


def remove_segments_of(pid: int) -> None:
    """Unlink what a dead worker left: segments it created that no receiver loaded.

    Call it after reaping the worker and after loading every message read from
    it, so a worker that died between creating a segment and its receiver
    unlinking it leaks nothing.
    """
    segments.remove_segments_of(pid, "msg")


def dumps_inline(obj: Any, *, what: str = "value") -> bytes:
    """A worker -> caller message whose storages all travel inline: it names no segment to release."""
    return _dumps(obj, to_device=False, what=what, threshold=math.inf)


def _dumps(obj: Any, *, to_device: bool, what: str, threshold: float) -> bytes:
    body = io.BytesIO()
    pickler = _Pickler(body, to_device=to_device)
    try:
        pickler.dump(obj)
    except Exception as exc:
        raise unpicklable(obj, what, exc, lambda part: _pickles(part, to_device)) from exc
    table = []
    blobs: list[memoryview] = []
    try:
        for stored in pickler.storages:
            if stored.nbytes >= threshold and stored.nbytes > 0:
                table.append(stored.entry(copy_to_segment(stored)))
            else:
                blobs.append(stored.host_bytes())
                table.append(stored.entry(None))
    except BaseException:
        for _, _, _, name in table:
            if name is not None:
                segments.unlink(name)
        raise
    head = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
    return b"".join([PREFIX.pack(MAGIC, len(head)), head, *blobs, body.getbuffer()])


def _read_table(view: memoryview) -> tuple[list[tuple[int, int, int, str | None]], int]:
    if len(view) < PREFIX.size:
        raise SerializationError(f"a message of {len(view)} bytes is too short to be a zerogpu message")
    magic, head_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise SerializationError(f"not a zerogpu message (it starts with {bytes(magic)!r})")
    offset = PREFIX.size + head_len
    try:
        table = pickle.loads(view[PREFIX.size : offset])
        for lo, nbytes, size, name in table:
            if not (lo >= 0 and nbytes >= 0 and size == padded(nbytes)):
                raise ValueError(f"bad entry {(lo, nbytes, size, name)!r}")
            if name is not None and (segments.parse(name) or (0, 0, ""))[2] != "msg":
                raise ValueError(f"bad entry {(lo, nbytes, size, name)!r}")
    except Exception as exc:
        raise SerializationError(f"the storage table of a message is corrupt: {exc}") from exc
    inline = sum(nbytes for _, nbytes, _, name in table if name is None)
    if offset + inline > len(view):
        raise SerializationError(
            f"a message of {len(view)} bytes is truncated: its table alone names {offset + inline} bytes"
        )
    return table, offset


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, *, to_device: bool):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.to_device = to_device
        # Only zerogpu.cuda.emulation marks tensors as emulated cuda, so while it is not imported
        # no tensor is one: look it up, never import it from here.
        self.emulation = sys.modules.get(EMULATION_MODULE)
        self.spans: dict[tuple[str, int], StoredSpan] = {}
        # Only the worker holds the packed tensors restored: by name caller -> worker only.
        self.references = _references() if to_device else None

    @property
    def storages(self) -> list[StoredSpan]:
        return list(self.spans.values())

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = self.references.key_of(obj) if self.references is not None else None
            return (_referenced, (key,)) if key is not None else self._reduce_tensor(obj)
        if isinstance(obj, StoredSpan):
            return (_storage, (obj.index,))
        if not self.to_device and _defined_in_main(obj):
            # The caller is the process this worker was forked from, so it has the object
            # under the same name. cloudpickle would send a copy of a __main__ class, and the
            # caller's `except MyError:` would not catch the look-alike it rebuilds.
            return obj.__qualname__
        return super().reducer_override(obj)

    def _reduce_tensor(self, tensor: torch.Tensor) -> Any:
        if tensor.is_nested or tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
            # torch's own pickling; a sparse tensor's indices and values come back through here.
            return NotImplemented
        storage = tensor.untyped_storage()
        itemsize = tensor.element_size()
        start = tensor.storage_offset() * itemsize
        end = start + extent(tensor) * itemsize
        key = (str(storage.device), storage.data_ptr())
        span = self.spans.get(key)
        if span is None:
            span = self.spans[key] = StoredSpan(len(self.spans), storage, start, end)
        else:
            span.cover(storage, start, end)
        on_device = self.to_device and (
            storage.device.type == "cuda" or (self.emulation is not None and self.emulation.is_cuda(tensor))
        )
        state = dict(tensor.__dict__) if tensor.__dict__ else None
        return (
            rebuild_tensor,
            (
                span,
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
                start,
                on_device,
                tensor.requires_grad,
                tensor.is_conj(),
                tensor.is_neg(),
                type(tensor),
                state,
            ),
        )


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storages: list[LoadedSpan]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_storage":
            return self._storage
        if module == __name__ and name == "_referenced":
            return _resolve
        return super().find_class(module, name)

    def _storage(self, index: int) -> LoadedSpan:
        return self.storages[index]


def _storage(index: int) -> LoadedSpan:
    """Stands in the pickle for `_Unpickler._storage`, which knows the message's storages."""
    raise SerializationError("a zerogpu message must be read with zerogpu.call.transport.loads()")


def _referenced(key: Hashable) -> torch.Tensor:
    """Stands in the pickle for a tensor sent by name; `_resolve` rebuilds it."""
    raise SerializationError("a zerogpu message must be read with zerogpu.call.transport.loads()")


def _resolve(key: Hashable) -> torch.Tensor:
    references = _references()
    if references is None:
        raise SerializationError(f"a message names the tensor {key!r}, but this process knows no tensors by name")
    return references.resolve(key)


def _open_storages(table: list, view: memoryview, offset: int) -> tuple[list[LoadedSpan], int]:
    """Map or copy a message's storages; return them and where its pickle starts."""
    storages = []
    names = [name for _, _, _, name in table if name is not None]
    try:
        for lo, nbytes, size, name in table:
            if name is None:
                host = torch.empty((size,), dtype=torch.uint8)
                host.numpy()[:nbytes] = view[offset : offset + nbytes]
                offset += nbytes
            else:
                host = map_storage(name, size)
            storages.append(LoadedSpan(host, lo, nbytes))
    finally:
        for name in names:
            segments.unlink(name)
    return storages, offset


def _defined_in_main(obj: Any) -> bool:
    """Whether obj is a class or function that __main__ holds under its qualified name."""
    if not isinstance(obj, (type, types.FunctionType)) or getattr(obj, "__module__", None) != "__main__":
        return False
    found: Any = sys.modules.get("__main__")
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _pickles(candidate: Any, to_device: bool) -> bool:
    try:
        _Pickler(_Discard(), to_device=to_device).dump(candidate)  # type: ignore[arg-type]
    except Exception:
        return False
    return True
