"""What crosses the socket between a caller and its worker.

A message is cloudpickle with one addition: torch tensors. Their bytes travel
beside the pickle, not inside it: small storages inline in the message, large
ones (at least `TENSOR_SHM_THRESHOLD` bytes) in a fresh POSIX shared-memory
segment whose name is all the pipe carries. The receiver maps the segment,
unlinks its name at once and keeps the mapping as the tensor's storage, so a
1 GB result costs one copy into the segment and none out of it.

Layout of a message (all integers little-endian):

    b"ZGT1" | u32 n | n bytes: pickled table of storages | inline storage bytes | pickle

Each table entry is (lo, nbytes, size, name): the bytes [lo, lo + nbytes) of
one storage of the sender, in a buffer of `size` bytes, either inline (name
None) or in the named segment. Tensors in the pickle refer to their entry by
index and keep their byte offset in the sender's storage, so tensors that
shared a storage share one again after `loads()`.

From worker to caller, classes and functions of `__main__` travel by name, not
by value as cloudpickle would send them: the caller is the process the worker
was forked from, so it has them, and `except MyError:` there catches the
caller's own class.

`Channel` frames messages over a connected SOCK_STREAM socket: an 8-byte
little-endian length, then the payload. Exceptions raised in the worker travel
as an `ExceptionPayload` and are rebuilt with `rebuild_exception`.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Protocol

import cloudpickle
import posix_ipc
import torch

from ..snapshot import segments
from ..errors import RemoteError, SerializationError, ZeroGPUError

TENSOR_SHM_THRESHOLD = 4 * 2**20
"""Storages of at least this many bytes travel through shared memory."""

MAX_FRAME = 2**40
"""A frame header announcing more than this is corrupt, not a message."""

MAGIC = b"ZGT1"
PREFIX = struct.Struct("<4sI")
FRAME_HEADER = struct.Struct("<Q")
# Rebuilt storages are padded to this many bytes and start at a multiple of it, so every
# dtype (complex128 is the widest, 16 bytes) can view them at its natural alignment.
ALIGN = 16
# Frames up to this size are read into a bytearray; larger ones into an anonymous mapping,
# whose pages are committed only as bytes arrive: a corrupt or lying length costs address
# space, not memory.
SMALL_FRAME = 2**20
WRITE_CHUNK = 2**26
EMULATION_MODULE = "zerogpu.cuda.emulation"
MAX_WALK = 100  # how deep an error looks for the part of an object that cannot be pickled


# -- tensors that both sides hold ----------------------------------------------------------


class References(Protocol):
    """Tensors both sides of a worker's socket already hold, sent by name rather than by value.

    A worker is forked from its caller, so the model's weights the caller packed
    are in the worker too (restored onto its device): an argument that holds
    them, a decorated method's `self` say, needs only their names.
    """

    def key_of(self, tensor: torch.Tensor) -> Hashable | None: ...

    def resolve(self, key: Hashable) -> torch.Tensor: ...


_references: References | None = None


def use_references(references: References | None) -> None:
    """Send the tensors `references` knows by name from now on (None: by value again)."""
    global _references
    _references = references


# -- messages ------------------------------------------------------------------------------


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


def loads(data: bytes | bytearray | memoryview | mmap.mmap) -> Any:
    """Rebuild the object of a message made by `dumps`.

    Shared-memory storages are mapped, not copied, and their names unlinked
    before anything else happens, so nothing is left in /dev/shm whatever
    becomes of the message.
    """
    view = memoryview(data).cast("B")
    table, offset = _read_table(view)
    storages, offset = _open_storages(table, view, offset)
    body = view[offset:]
    try:
        return _Unpickler(io.BytesIO(body), storages).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"could not rebuild a message: {_describe_exception(exc)}") from exc


def discard(data: bytes | bytearray | memoryview | mmap.mmap) -> None:
    """Release the shared-memory segments of a message that will never be loaded.

    Harmless for a message already loaded: its segments are gone already.
    The caller discards its argument message once the worker is reaped.
    """
    table, _ = _read_table(memoryview(data).cast("B"))
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


def _dumps(obj: Any, *, to_device: bool, what: str, threshold: float) -> bytes:
    body = io.BytesIO()
    pickler = _Pickler(body, to_device=to_device)
    try:
        pickler.dump(obj)
    except Exception as exc:
        raise _unpicklable(obj, what, exc, to_device) from exc
    table = []
    blobs: list[memoryview] = []
    try:
        for stored in pickler.storages:
            if stored.nbytes >= threshold and stored.nbytes > 0:
                table.append(stored.entry(_copy_to_segment(stored)))
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
            if not (lo >= 0 and nbytes >= 0 and size == _round_up(nbytes, ALIGN)):
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


# -- tensors: sending ----------------------------------------------------------------------


class _StoredSpan:
    """The bytes of one sender storage that the tensors of a message use."""

    def __init__(self, index: int, storage: torch.UntypedStorage, start: int, end: int):
        self.index = index
        self.storage = storage
        self.start = start
        self.end = end

    def cover(self, storage: torch.UntypedStorage, start: int, end: int) -> None:
        # Two storages at one address (two frombuffer() of one buffer) alias each other:
        # keep the larger, whose bytes include the other's.
        if storage.nbytes() > self.storage.nbytes():
            self.storage = storage
        self.start = min(self.start, start)
        self.end = max(self.end, end)

    @property
    def lo(self) -> int:
        return self.start // ALIGN * ALIGN

    @property
    def nbytes(self) -> int:
        # An empty tensor may sit past its storage's end; it needs no bytes from there.
        return max(0, min(self.end, self.storage.nbytes()) - self.lo)

    def entry(self, name: str | None) -> tuple[int, int, int, str | None]:
        return (self.lo, self.nbytes, _round_up(self.nbytes, ALIGN), name)

    def source(self) -> torch.Tensor:
        """The span as a uint8 tensor on the storage's own device (no copy)."""
        flat = torch.empty((0,), dtype=torch.uint8, device=self.storage.device)
        return flat.set_(self.storage, self.lo, (self.nbytes,), (1,))

    def host_bytes(self) -> memoryview:
        return memoryview(self.source().cpu().numpy())


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, *, to_device: bool):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.to_device = to_device
        # Only zerogpu.cuda.emulation marks tensors as emulated cuda, so while it is not imported
        # no tensor is one: look it up, never import it from here.
        self.emulation = sys.modules.get(EMULATION_MODULE)
        self.spans: dict[tuple[str, int], _StoredSpan] = {}

    @property
    def storages(self) -> list[_StoredSpan]:
        return list(self.spans.values())

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = _references.key_of(obj) if self.to_device and _references is not None else None
            return (_referenced, (key,)) if key is not None else self._reduce_tensor(obj)
        if isinstance(obj, _StoredSpan):
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
        end = start + _extent(tensor) * itemsize
        key = (str(storage.device), storage.data_ptr())
        span = self.spans.get(key)
        if span is None:
            span = self.spans[key] = _StoredSpan(len(self.spans), storage, start, end)
        else:
            span.cover(storage, start, end)
        on_device = self.to_device and (
            storage.device.type == "cuda" or (self.emulation is not None and self.emulation.is_cuda(tensor))
        )
        state = dict(tensor.__dict__) if tensor.__dict__ else None
        return (
            _tensor,
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


def _copy_to_segment(span: _StoredSpan) -> str:
    """Copy a span into a new segment straight from its device; return the segment's name."""
    size = _round_up(span.nbytes, ALIGN)
    name = "/" + segments.new_name("msg")
    try:
        segment = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except (posix_ipc.Error, OSError) as exc:
        raise SerializationError(
            f"could not create a shared-memory segment of {size} bytes for a tensor: {exc}"
        ) from exc
    try:
        source = span.source()
        if source.device.type == "cpu":
            _write_all(segment.fd, memoryview(source.numpy()))
        else:
            _copy_from_device(segment.fd, size, source)
    except OSError as exc:
        segments.unlink(name)
        raise SerializationError(
            f"could not write {size} bytes of shared memory for a tensor ({exc}); "
            f"free space in {segments.SHM_DIR} or send smaller tensors"
        ) from exc
    except BaseException:
        segments.unlink(name)
        raise
    finally:
        segment.close_fd()
    return name


def _write_all(fd: int, data: memoryview) -> None:
    # write(), not a mapping: tmpfs copies the bytes into its pages without faulting each
    # one into this process (faster), and a full /dev/shm is ENOSPC here rather than a
    # SIGBUS that kills the process. It is also not torch's copy, whose OpenMP threads hang
    # in a process forked after its parent used them, as a worker is.
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written : written + WRITE_CHUNK], written)


def _copy_from_device(fd: int, size: int, source: torch.Tensor) -> None:
    # Reserve the pages first: a copy into a mapping of a full /dev/shm raises SIGBUS;
    # fallocate says ENOSPC instead.
    os.posix_fallocate(fd, 0, size)
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    try:
        target = torch.frombuffer(mapping, dtype=torch.uint8, count=source.numel())
        target.copy_(source)
        del target
    finally:
        mapping.close()


# -- tensors: receiving --------------------------------------------------------------------


class _LoadedSpan:
    """A received storage span: host bytes, and their device copy once a tensor asks for it."""

    def __init__(self, host: torch.Tensor, lo: int, nbytes: int):
        self.host = host
        self.lo = lo
        self.nbytes = nbytes
        self._device: torch.Tensor | None = None

    def on_device(self) -> torch.Tensor:
        # One copy per storage, so tensors that shared a storage still share it on the device.
        if self._device is None:
            self._device = self.host.to("cuda")
        return self._device


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storages: list[_LoadedSpan]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_storage":
            return self._storage
        if module == __name__ and name == "_referenced":
            return _resolve
        return super().find_class(module, name)

    def _storage(self, index: int) -> _LoadedSpan:
        return self.storages[index]


def _storage(index: int) -> _LoadedSpan:
    """Stands in the pickle for `_Unpickler._storage`, which knows the message's storages."""
    raise SerializationError("a zerogpu message must be read with zerogpu.call.transport.loads()")


def _referenced(key: Hashable) -> torch.Tensor:
    """Stands in the pickle for a tensor sent by name; `_resolve` rebuilds it."""
    raise SerializationError("a zerogpu message must be read with zerogpu.call.transport.loads()")


def _resolve(key: Hashable) -> torch.Tensor:
    if _references is None:
        raise SerializationError(f"a message names the tensor {key!r}, but this process knows no tensors by name")
    return _references.resolve(key)


def _open_storages(table: list, view: memoryview, offset: int) -> tuple[list[_LoadedSpan], int]:
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
                host = _map_segment(name, size)
            storages.append(_LoadedSpan(host, lo, nbytes))
    finally:
        for name in names:
            segments.unlink(name)
    return storages, offset


def _map_segment(name: str, size: int) -> torch.Tensor:
    try:
        segment = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError as exc:
        raise SerializationError(
            f"the shared-memory segment {name} of a message is gone: was the message loaded twice, "
            "or its segments removed before it was loaded?"
        ) from exc
    try:
        if segment.size < size:
            raise SerializationError(f"the shared-memory segment {name} holds {segment.size} bytes, not {size}")
        mapping = mmap.mmap(segment.fd, size)
    finally:
        segment.close_fd()
    # The tensor holds the mapping: its storage is the segment's memory, unmapped with it.
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _tensor(
    span: _LoadedSpan,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    start: int,
    on_device: bool,
    requires_grad: bool,
    conj: bool,
    neg: bool,
    cls: type,
    state: dict | None,
) -> torch.Tensor:
    itemsize = dtype.itemsize
    offset, misaligned = divmod(start - span.lo, itemsize)
    extent = _extent_of(shape, stride) * itemsize
    if (
        misaligned
        or offset < 0
        or len(shape) != len(stride)
        or any(step < 0 for step in stride)
        or (extent and start + extent > span.lo + span.nbytes)
    ):
        raise SerializationError(
            f"a {dtype} tensor of shape {list(shape)} lies outside the bytes sent for it: the message is corrupt"
        )
    base = span.on_device() if on_device else span.host
    # set_() on a tensor made from `base` keeps the new tensor on base's device, emulated or real.
    tensor = base.new_empty((0,), dtype=dtype).set_(base.untyped_storage(), offset, shape, stride)
    if neg:
        tensor = torch._neg_view(tensor)
    if conj:
        tensor = tensor.conj()
    if cls is torch.nn.Parameter:
        tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        if cls is not torch.Tensor:
            tensor = tensor.as_subclass(cls)
        if requires_grad:
            tensor.requires_grad_(True)
    if state:
        tensor.__dict__.update(state)
    return tensor


def _extent(tensor: torch.Tensor) -> int:
    return _extent_of(tuple(tensor.shape), tuple(tensor.stride()))


def _extent_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a tensor's first to one past its last, in storage order."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _defined_in_main(obj: Any) -> bool:
    """Whether obj is a class or function that __main__ holds under its qualified name."""
    if not isinstance(obj, (type, types.FunctionType)) or getattr(obj, "__module__", None) != "__main__":
        return False
    found: Any = sys.modules.get("__main__")
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


# -- errors about pickling -----------------------------------------------------------------


def _unpicklable(obj: Any, what: str, exc: Exception, to_device: bool) -> SerializationError:
    """Say which object inside `obj` could not be pickled, and where it sits."""

    def pickles(candidate: Any) -> bool:
        try:
            _Pickler(_Discard(), to_device=to_device).dump(candidate)  # type: ignore[arg-type]
        except Exception:
            return False
        return True

    # cloudpickle turns a RecursionError into a PicklingError caused by it.
    if isinstance(exc, RecursionError) or isinstance(exc.__cause__, RecursionError):
        return SerializationError(
            f"{what} is nested too deeply to be pickled ({_describe_exception(exc)}); flatten it"
        )
    where, culprit = what, obj
    seen = {id(obj)}
    # Walk down while some part fails on its own; the last one is the offender. This runs
    # only after pickling failed, and pickle's own error names a type but not a place.
    for _ in range(MAX_WALK):
        for place, part in _parts(culprit, where):
            if id(part) not in seen and not pickles(part):
                seen.add(id(part))
                where, culprit = place, part
                break
        else:
            break
    return SerializationError(f"{where} ({_a(type(culprit))}) cannot be pickled: {_describe_exception(exc)}")


def _parts(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield f"{where}[{index}]", item
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{where}[{key!r}]", value
            yield f"a key of {where}", key
    elif isinstance(obj, (set, frozenset)):
        for item in obj:
            yield f"an item of {where}", item
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{where}'s variable {name!r}", cell.cell_contents
            except ValueError:  # an empty cell
                pass
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                yield f"{where}'s global {name!r}", obj.__globals__[name]
    elif isinstance(obj, types.MethodType):
        yield f"{where}.__self__", obj.__self__
    else:
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in attributes.items():
                yield f"{where}.{name}", value


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _a(cls: type) -> str:
    name = _qualified_name(cls)
    return f"an {name}" if name[0].lower() in "aeiou" else f"a {name}"


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_text(exc)}"


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


# -- exceptions ----------------------------------------------------------------------------


@dataclass
class ExceptionPayload:
    """An exception raised in the worker, as it travels to the caller."""

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None


class RemoteTraceback(ZeroGPUError):
    """The worker's formatted traceback, chained as the cause of an exception it raised."""

    def __init__(self, text: str):
        super().__init__(text)
        self.traceback = text

    def __str__(self) -> str:
        return self.traceback


def capture_exception(exc: BaseException) -> ExceptionPayload:
    """Record an exception in the worker so that the caller can raise it again.

    The exception is pickled only if it survives a round trip here with its type
    and message intact (a custom __init__ signature often does not); otherwise
    the caller gets a RemoteError with its type name, message and traceback.
    """
    message = _text(exc)
    formatted = "".join(traceback.format_exception(exc))
    try:
        # Inline only: the round trip below loads the message, which would unlink its segments.
        pickled = _dumps(exc, to_device=False, what="exception", threshold=math.inf)
        if not _same_exception(loads(pickled), type(exc), message):
            pickled = None
    except Exception:
        pickled = None
    return ExceptionPayload(_qualified_name(type(exc)), message, formatted, pickled)


def rebuild_exception(payload: ExceptionPayload) -> BaseException:
    """The exception the worker raised, to raise in the caller, its traceback as cause."""
    cause = RemoteTraceback(payload.traceback)
    rebuilt: BaseException | None = None
    if payload.pickled is not None:
        try:
            candidate = loads(payload.pickled)
        except Exception:
            candidate = None
        if (
            isinstance(candidate, BaseException)
            and _qualified_name(type(candidate)) == payload.type_name
            and _text(candidate) == payload.message
        ):
            rebuilt = candidate
    if rebuilt is None:
        rebuilt = RemoteError(payload.type_name, payload.message, payload.traceback)
    rebuilt.__cause__ = cause
    return rebuilt


def _same_exception(candidate: Any, cls: type, message: str) -> bool:
    return type(candidate) is cls and _text(candidate) == message


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# -- framing -------------------------------------------------------------------------------


class Channel:
    """Messages over a connected SOCK_STREAM socket: an 8-byte little-endian length, then the payload.

    The channel owns the socket: it makes it blocking and closes it. Threads
    may send while another receives; their frames never interleave. A `recv` that times out in the middle of a
    frame keeps what it read, and the next `recv` goes on from there.
    """

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._header = bytearray(FRAME_HEADER.size)
        self._payload: bytearray | mmap.mmap | None = None
        self._received = 0
        self._broken: Exception | None = None  # why the stream can no longer be read
        self._sending = threading.Lock()

    def send(self, obj: Any, *, to_device: bool, what: str = "value") -> None:
        """Pickle `obj` (see `dumps`) and send it; its segments are released if sending fails."""
        payload = dumps(obj, to_device=to_device, what=what)
        try:
            self.send_bytes(payload)
        except BaseException:
            discard(payload)
            raise

    def send_bytes(self, payload: bytes | bytearray | memoryview) -> None:
        """Send a message made earlier by `dumps` (arguments are pickled before forking)."""
        header = FRAME_HEADER.pack(len(payload))
        # sendall() loops over partial writes and retries on EINTR (PEP 475); MSG_NOSIGNAL
        # turns a closed peer into EPIPE even where the program restored SIGPIPE's default.
        try:
            with self._sending:
                if len(payload) <= SMALL_FRAME:
                    self._sock.sendall(header + payload, socket.MSG_NOSIGNAL)
                else:
                    self._sock.sendall(header, socket.MSG_NOSIGNAL)
                    self._sock.sendall(payload, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EOFError("the other side of the channel has closed it") from exc

    def recv(self, timeout: float | None = None) -> Any:
        """The next message's object. EOFError when the peer closed; TimeoutError when nothing came in time."""
        return loads(self.recv_bytes(timeout))

    def recv_bytes(self, timeout: float | None = None) -> bytearray | mmap.mmap:
        """The next message's payload, not yet loaded."""
        if self._broken is not None:
            raise type(self._broken)(*self._broken.args)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            target = self._header if self._payload is None else self._payload
            self._fill(target, deadline)
            if self._payload is None:
                (length,) = FRAME_HEADER.unpack(self._header)
                if length > MAX_FRAME:
                    self._broken = SerializationError(
                        f"a frame header announces {length} bytes, more than the limit of {MAX_FRAME}: "
                        "the stream is corrupt"
                    )
                    raise self._broken
                try:
                    self._payload = bytearray(length) if length <= SMALL_FRAME else mmap.mmap(-1, length)
                except (OSError, MemoryError) as exc:
                    self._broken = SerializationError(
                        f"this process cannot hold a frame of {length} bytes ({exc}); "
                        "send large data as tensors, which travel through shared memory"
                    )
                    raise self._broken from exc
                self._received = 0
            else:
                payload, self._payload, self._received = self._payload, None, 0
                return payload

    def _fill(self, target: bytearray | mmap.mmap, deadline: float | None) -> None:
        view = memoryview(target)
        while self._received < len(target):
            if deadline is not None:
                wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
                # poll() retries on EINTR with the time that is left (PEP 475).
                if not self._poller.poll(wait_ms):
                    raise TimeoutError("no message arrived in time")
            # recv_into() retries on EINTR and, after a readable poll, returns at once.
            count = self._sock.recv_into(view[self._received :])
            if count == 0:
                if target is self._header and self._received == 0:
                    raise EOFError("the other side of the channel has closed it")
                part = "header" if target is self._header else "payload"
                self._broken = EOFError(
                    f"the channel closed in the middle of a frame "
                    f"({self._received} of the {len(target)} bytes of its {part} arrived)"
                )
                raise self._broken
            self._received += count

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
        self._payload = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = [
    "TENSOR_SHM_THRESHOLD",
    "Channel",
    "ExceptionPayload",
    "References",
    "RemoteTraceback",
    "capture_exception",
    "discard",
    "dumps",
    "loads",
    "rebuild_exception",
    "remove_segments_of",
    "segments_of",
    "use_references",
]
