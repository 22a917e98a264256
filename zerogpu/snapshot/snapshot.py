"""Shared-memory snapshots: named tensors packed once into one POSIX segment.

A snapshot is one shared-memory segment, ``/dev/shm/zerogpu-<pid>-<random>``
(mode 0600), laid out as::

    header | manifest (JSON) | padding to a page | data region

The data region holds each distinct storage once, every one aligned to
``ALIGN`` bytes (large ones to a page), so the bytes can be restored by one
bulk copy and the tensors rebuilt as views of any buffer with that layout
(`Snapshot.views`). The segment carries its own header and manifest, so
another process needs only the name to attach it.

The owner (the process that packed it) locks it in RAM when RLIMIT_MEMLOCK
allows and unlinks its name on `close`, when the Snapshot is collected and at
interpreter exit; a forked child never unlinks its parent's segment. Memory
stays mapped as long as a tensor views it. `sweep` removes the segments of
owners that died without unlinking them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import resource
import struct
import warnings
import weakref
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import posix_ipc
import torch

from . import segments
from ..errors import InvalidArgument, SnapshotError
from ..units import describe_size


MAGIC = b"ZGPUSNAP"
VERSION = 1
# magic, format version, CRC-32 of the manifest, manifest length, data offset, data length
HEADER = struct.Struct("<8sIIQQQ")

ALIGN = 256  # every storage starts on this boundary: enough for any dtype and vector loads
PAGE = mmap.PAGESIZE
LARGE = 1 << 20  # storages at least this big start on a page boundary
CHUNK = 64 << 20  # bytes copied between two progress reports

# Names torch gives its dtypes ("float32", "bfloat16", ...). Quantized dtypes are
# left out: their tensors carry scales that are not in the storage.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype) and not str(dtype).startswith(("torch.qint", "torch.quint"))
}

# The dtype codes of the safetensors format that torch can hold.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "F4": "float4_e2m1fn_x2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# safetensors counts 4-bit values; torch packs two per element along the last dimension.
PAIRED = {dtype for dtype in (getattr(torch, "float4_e2m1fn_x2", None),) if dtype is not None}
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit on its JSON header

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Entry:
    """One tensor of the manifest.

    The tensor is `dtype`, `shape` and `stride` over a storage of `nbytes`
    bytes that starts `offset` bytes into the data region, beginning
    `storage_offset` elements into it. Entries with the same `offset` and
    `nbytes` share one storage.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    offset: int
    nbytes: int

    @property
    def extent(self) -> int:
        """Bytes from the start of the storage to the end of the tensor's last element."""
        if any(size == 0 for size in self.shape):
            return 0
        last = self.storage_offset + sum((size - 1) * step for size, step in zip(self.shape, self.stride))
        return (last + 1) * self.dtype.itemsize


class Snapshot:
    """Named tensors in one shared-memory segment; see the module docstring.

    Make one with `pack`, `load_safetensors` or `attach`; keep the owner's
    Snapshot alive as long as other processes may attach it.
    """

    name: str
    nbytes: int
    entries: list[Entry]

    def __init__(self, name: str, segment: mmap.mmap, data_offset: int, nbytes: int,
                 entries: list[Entry], *, owner: bool):
        self.name = name
        self.nbytes = nbytes
        self.entries = entries
        self._data_offset = data_offset
        # Tensors made by torch.frombuffer keep the mmap object, hence the mapping, alive;
        # closing drops this reference and the mapping goes with the last view. The mmap
        # is never closed explicitly: that would unmap memory that live tensors still view.
        self._segment: mmap.mmap | None = segment
        self._unlink = weakref.finalize(self, unlink_if_owner, name, os.getpid() if owner else None)

    # ---- making one

    @classmethod
    def pack(cls, tensors: Mapping[str, torch.Tensor], *, progress: Progress | None = None) -> Snapshot:
        """Copy `tensors` into a new segment, each storage once.

        Tensors that share a storage come back sharing one, with the same
        strides and storage offsets. A whole storage is packed even when only a
        small view of it is given (a 10-element slice of a 1 GB weight costs
        1 GB): that keeps every view exact; `.clone()` such views first to
        pack only their elements. `progress(n)` is called as each `n` bytes
        are copied.
        """
        items = checked_tensors(tensors)
        entries, copies = layout_storages(items)

        def write(fd: int, data_offset: int) -> None:
            for source, offset in copies:
                write_bytes(fd, source, data_offset + offset, progress)

        return cls._create(entries, write)

    @classmethod
    def load_safetensors(cls, path: str | os.PathLike, *, progress: Progress | None = None) -> Snapshot:
        """Read a `.safetensors` file straight into a new segment (no copy in between)."""
        path = Path(path)
        try:
            file = open(path, "rb")
        except OSError as error:
            raise InvalidArgument(f"cannot read {path}: {error.strerror or error}") from None
        # One open file for the header and the bytes: a file replaced in between
        # (a download renamed over it) cannot fill the layout read from another.
        with file:
            data_start, found = read_safetensors_header(path, file)
            entries: list[Entry] = []
            cursor = 0
            for name, dtype, shape, begin, end in found:
                offset = align_storage(cursor, end - begin)
                stride = torch.empty(shape, device="meta").stride()
                entries.append(Entry(name, dtype, shape, stride, 0, offset, end - begin))
                cursor = offset + end - begin

            def write(fd: int, data_offset: int) -> None:
                for entry, (_, _, _, begin, _) in zip(entries, found):
                    send_bytes(fd, file.fileno(), data_start + begin, data_offset + entry.offset, entry.nbytes,
                               progress)

            return cls._create(entries, write)

    @classmethod
    def _create(cls, entries: list[Entry], write: Callable[[int, int], None]) -> Snapshot:
        """Make the segment for `entries`, fill its data region with `write(fd, data_offset)`, map it."""
        manifest = json.dumps([entry_to_json(entry) for entry in entries]).encode()
        nbytes = max((entry.offset + entry.nbytes for entry in entries), default=0)
        data_offset = round_up(HEADER.size + len(manifest), PAGE)
        size = data_offset + nbytes
        check_free_space(size)

        name = segments.new_name()
        try:
            shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
        except (OSError, posix_ipc.Error) as error:
            raise SnapshotError(f"could not create shared-memory segment {name} of {describe_size(size)}: {error}") from error
        try:
            # The data goes in through the file descriptor, not the mapping: tmpfs then fills
            # whole pages without zeroing them first or faulting them into this process one
            # by one (measured about twice as fast as copying into a fresh mapping), and a
            # full /dev/shm is an ENOSPC error here instead of a SIGBUS on a mapped write.
            write(shm.fd, data_offset)
            os.pwrite(shm.fd, manifest, HEADER.size)
            # The header goes last: a segment whose copy failed half-way never looks valid.
            os.pwrite(shm.fd, HEADER.pack(MAGIC, VERSION, zlib.crc32(manifest), len(manifest), data_offset, nbytes), 0)
            segment = mmap.mmap(shm.fd, size)
        except BaseException as error:
            shm.unlink()
            if isinstance(error, OSError):
                advice = "; free space there or make it larger" if error.errno == errno.ENOSPC else ""
                raise SnapshotError(f"could not write snapshot {name} ({describe_size(size)}) into {segments.SHM_DIR}: "
                                    f"{error.strerror or error}{advice}") from error
            raise
        finally:
            shm.close_fd()
        snapshot = cls(name, segment, data_offset, nbytes, entries, owner=True)
        lock_in_ram(snapshot._whole(), name)
        return snapshot

    @classmethod
    def attach(cls, name: str) -> Snapshot:
        """Map the snapshot called `name` (made by any process) read-only."""
        parsed = segments.parse(name)
        if parsed is None or parsed[2] != "":
            raise InvalidArgument(f"{name!r} is not a snapshot name: expected 'zerogpu-<pid>-<hex>' (Snapshot.name)")
        name = parsed[0]
        try:
            shm = posix_ipc.SharedMemory("/" + name, read_only=True)
        except posix_ipc.ExistentialError:
            raise SnapshotError(f"no snapshot named {name}: its owner closed it or exited; pack it again") from None
        except (OSError, posix_ipc.Error) as error:
            raise SnapshotError(f"could not open snapshot {name}: {error}") from error
        try:
            size = shm.size
            if size < HEADER.size:
                raise SnapshotError(f"segment {name} is too short to be a snapshot ({size} bytes, the header alone "
                                    f"is {HEADER.size}): it was not made by Snapshot.pack; pack the weights again")
            segment = mmap.mmap(shm.fd, size, access=mmap.ACCESS_READ)
        finally:
            shm.close_fd()
        try:
            data_offset, nbytes, entries = read_manifest(name, segment)
        except BaseException:
            segment.close()  # now, not whenever the exception's traceback lets go of it
            raise
        return cls(name, segment, data_offset, nbytes, entries, owner=False)

    # ---- using one

    @property
    def address(self) -> int:
        """Where the data region starts in this process's memory."""
        return self._whole().data_ptr() + self._data_offset

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view of the segment, in host memory (call once and keep the dict)."""
        return self.views(self._whole()[self._data_offset:self._data_offset + self.nbytes])

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors rebuilt over `buffer`: any 1-D uint8 tensor of `nbytes` on any device
        holding this snapshot's data region (a copy restored to a GPU, for instance)."""
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
                or not buffer.is_contiguous() or buffer.numel() != self.nbytes:
            described = (f"a {buffer.dtype} tensor of shape {tuple(buffer.shape)}" if isinstance(buffer, torch.Tensor)
                         else f"a {type(buffer).__name__}")
            raise InvalidArgument(f"views() needs a contiguous 1-D torch.uint8 tensor of {self.nbytes} bytes "
                                  f"(Snapshot.nbytes); got {described}")
        whole = buffer.untyped_storage()
        start = buffer.storage_offset()
        storages: dict[tuple[int, int], torch.UntypedStorage] = {}
        views = {}
        for entry in self.entries:
            key = (entry.offset, entry.nbytes)
            if key not in storages:
                # A slice of an UntypedStorage is a storage that starts at that byte and keeps
                # the whole one alive, so each rebuilt tensor has its own storage_offset back.
                storages[key] = whole[start + entry.offset:start + entry.offset + entry.nbytes]
            view = torch.empty(0, dtype=entry.dtype, device=buffer.device)
            views[entry.name] = view.set_(storages[key], entry.storage_offset, entry.shape, entry.stride)
        return views

    def save_safetensors(self, path: str | os.PathLike) -> None:
        """Write the tensors to a `.safetensors` file, streamed from the segment.

        safetensors cannot express shared storage or strides, so every tensor is
        written as its own contiguous copy (one at a time for those that need one).
        """
        codes = []
        for entry in self.entries:
            if entry.name == "__metadata__":
                raise InvalidArgument("a tensor named '__metadata__' cannot be saved: safetensors keeps that key "
                                      "for the file's metadata; rename it")
            code = SAFETENSORS_CODES.get(entry.dtype)
            if code is None:
                raise InvalidArgument(f"{entry.name!r} is {entry.dtype}, which safetensors cannot store; "
                                      f"it stores {', '.join(sorted(SAFETENSORS_DTYPES))}")
            if entry.dtype in PAIRED and not entry.shape:
                raise InvalidArgument(f"{entry.name!r} is a 0-dim {entry.dtype} tensor, which safetensors cannot "
                                      f"store (it counts 4-bit values along the last dimension): reshape it to (1,)")
            codes.append(code)
        tensors = self.tensors()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        cursor = 0
        for entry, code in zip(self.entries, codes):
            length = tensors[entry.name].numel() * entry.dtype.itemsize
            shape = list(entry.shape)
            if entry.dtype in PAIRED:
                shape[-1] *= 2
            header[entry.name] = {"dtype": code, "shape": shape, "data_offsets": [cursor, cursor + length]}
            cursor += length
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads its header so the data starts 8-byte aligned

        path = Path(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as file:  # buffered: its write() writes all, in pieces past 2 GB
                file.write(struct.pack("<Q", len(encoded)) + encoded)
                for entry in self.entries:
                    # contiguous() returns contiguous tensors as they are: their bytes are
                    # written straight from the segment.
                    flat = tensors[entry.name].contiguous().reshape(-1).view(torch.uint8)
                    file.write(flat.numpy())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Unmap (once the last view of it is gone) and, in the owner, unlink the name."""
        self._unlink()
        self._segment = None

    @property
    def closed(self) -> bool:
        return self._segment is None

    def _whole(self) -> torch.Tensor:
        """The whole segment as a uint8 tensor that keeps the mapping alive."""
        if self._segment is None:
            raise SnapshotError(f"snapshot {self.name} is closed")
        with warnings.catch_warnings():
            # An attached segment is mapped read-only on purpose (writes fault), which torch
            # warns about for every non-writable buffer.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._segment, dtype=torch.uint8)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self):
        # Another process attaches the segment rather than receiving its bytes.
        return (type(self).attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self.closed else describe_size(self.nbytes)
        return f"<Snapshot {self.name}: {len(self.entries)} tensors, {state}>"


def sweep() -> list[str]:
    """Unlink the segments whose owning process is dead; return their names."""
    return segments.sweep()


def unlink_if_owner(name: str, owner: int | None) -> None:
    """Unlink `name` when called in the process that made it (not in a forked child)."""
    if owner == os.getpid():
        segments.unlink(name)


# ---- packing


def checked_tensors(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `tensors`, or InvalidArgument for the first that cannot be packed."""
    if not isinstance(tensors, Mapping):
        raise InvalidArgument(f"Snapshot.pack takes a mapping of names to tensors, not a {type(tensors).__name__}")
    items = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor names must be strings; got {name!r} ({type(name).__name__})")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgument(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor: pack tensors only")
        if tensor.is_nested:
            raise InvalidArgument(f"{name!r} is a nested tensor: pack its components (.unbind()) instead")
        if tensor.layout != torch.strided:
            raise InvalidArgument(f"{name!r} has layout {tensor.layout}; only dense tensors can be packed: "
                                  f"convert it with .to_dense()")
        if tensor.is_meta:
            raise InvalidArgument(f"{name!r} is a meta tensor and has no data: load or initialize its values first")
        if tensor.is_quantized:
            raise InvalidArgument(f"{name!r} is quantized ({tensor.dtype}): pack .dequantize() or .int_repr() "
                                  f"with its scales instead")
        if tensor.is_conj() or tensor.is_neg():
            raise InvalidArgument(f"{name!r} is a lazily conjugated or negated view: call .resolve_conj() and "
                                  f".resolve_neg() first")
        try:
            device = tensor.untyped_storage().device
        except (RuntimeError, NotImplementedError) as error:
            raise InvalidArgument(f"{name!r} ({type(tensor).__name__}) has no storage to pack: {error}") from None
        if device.type != "cpu":
            raise InvalidArgument(f"{name!r} has its data on {device}; pass CPU tensors (move them with .cpu())")
        items.append((name, tensor))
    return items


def layout_storages(items: list[tuple[str, torch.Tensor]]) -> tuple[list[Entry], list[tuple[memoryview, int]]]:
    """Place every distinct storage of `items` in the data region.

    Returns the entries and the copies that fill the region: (source bytes,
    destination offset). Storages are told apart by the memory they cover;
    distinct storages over overlapping memory (two torch.frombuffer views of
    one buffer, say) go into one block at the same relative places, so they
    alias after a restore as they did before.
    """
    first_use: dict[tuple[int, int], tuple[int, torch.UntypedStorage]] = {}
    for index, (_, tensor) in enumerate(items):
        storage = tensor.untyped_storage()
        first_use.setdefault((storage.data_ptr(), storage.nbytes()), (index, storage))

    # Merge storages that overlap into blocks (empty ones overlap nothing), then lay the
    # blocks out in the order their tensors came, so the region follows the caller's order.
    blocks: list[list[tuple[int, int]]] = []
    end = 0
    for start, length in sorted(key for key in first_use if key[1] > 0):
        if blocks and start < end:
            blocks[-1].append((start, length))
            end = max(end, start + length)
        else:
            blocks.append([(start, length)])
            end = start + length
    blocks += [[key] for key in first_use if key[1] == 0]
    blocks.sort(key=lambda block: min(first_use[key][0] for key in block))

    places: dict[tuple[int, int], int] = {}
    copies = []
    cursor = 0
    for block in blocks:
        base = block[0][0]
        length = max(start + size for start, size in block) - base
        offset = align_storage(cursor, length)
        for key in block:
            places[key] = offset + key[0] - base
            # Members of one block copy the bytes they share more than once: rare, and
            # simpler than reading raw memory that no single storage covers.
            copies.append((storage_bytes(first_use[key][1]), places[key]))
        cursor = offset + length

    entries = []
    for name, tensor in items:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        entries.append(Entry(name, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()),
                             tensor.storage_offset(), places[key], key[1]))
    return entries, copies


def storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage, without copying them."""
    if storage.nbytes() == 0:
        return memoryview(b"")
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())


def align_storage(cursor: int, nbytes: int) -> int:
    return round_up(cursor, PAGE if nbytes >= LARGE else ALIGN)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def write_bytes(fd: int, source: memoryview, offset: int, progress: Progress | None) -> None:
    """pwrite `source` at `offset`, reporting progress every CHUNK bytes."""
    for start in range(0, len(source), CHUNK):
        piece = source[start:start + CHUNK]
        done = 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], offset + start + done)
        if progress is not None:
            progress(len(piece))


def send_bytes(fd: int, source_fd: int, source_offset: int, offset: int, nbytes: int,
               progress: Progress | None) -> None:
    """Copy `nbytes` of a file into the segment inside the kernel (sendfile), reporting progress."""
    os.lseek(fd, offset, os.SEEK_SET)
    for start in range(0, nbytes, CHUNK):
        length = min(CHUNK, nbytes - start)
        done = 0
        while done < length:
            sent = os.sendfile(fd, source_fd, source_offset + start + done, length - done)
            if sent == 0:
                raise SnapshotError("the file ended early: it shrank while it was being read")
            done += sent
        if progress is not None:
            progress(length)


def check_free_space(size: int) -> None:
    """InvalidArgument, before anything is made, when /dev/shm cannot hold `size` bytes."""
    free, total = segments.free_space()
    if size > free:
        raise InvalidArgument(
            f"the snapshot needs {describe_size(size)} of shared memory but {segments.SHM_DIR} has only "
            f"{describe_size(free)} free (of {describe_size(total)}): free space there "
            f"(zerogpu.snapshot.snapshot.sweep() removes segments of dead processes) or make it larger "
            f"(docker run --shm-size=..., or mount -o remount,size=... {segments.SHM_DIR})")


# mlock(2) has no binding in Python's standard library.
libc = ctypes.CDLL(None, use_errno=True)
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
memlock_warned = False


def lock_in_ram(whole: torch.Tensor, name: str) -> bool:
    """Lock the segment in RAM so a restore never waits on swap; warn once per process when
    RLIMIT_MEMLOCK does not allow it."""
    global memlock_warned
    size = whole.numel()
    if libc.mlock(whole.data_ptr(), size) == 0:
        return True
    reason = os.strerror(ctypes.get_errno())
    if not memlock_warned:
        memlock_warned = True
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else describe_size(soft)
        warnings.warn(
            f"zerogpu: snapshot {name} ({describe_size(size)}) is not locked in RAM ({reason}): RLIMIT_MEMLOCK "
            f"allows {limit}. Restores may wait on swap. Raise the limit: `ulimit -l unlimited` in the shell "
            f"that starts the app, LimitMEMLOCK=infinity for a systemd service, --ulimit memlock=-1 for docker.",
            RuntimeWarning, stacklevel=4)
    return False


# ---- the manifest


def entry_to_json(entry: Entry) -> dict[str, object]:
    fields = asdict(entry)
    fields["dtype"] = str(entry.dtype).removeprefix("torch.")
    return fields


def read_manifest(name: str, segment: mmap.mmap) -> tuple[int, int, list[Entry]]:
    """The data offset, data length and entries of a mapped segment, checked; SnapshotError if not sound."""
    magic, version, checksum, manifest_length, data_offset, nbytes = HEADER.unpack_from(segment, 0)
    if magic != MAGIC:
        raise SnapshotError(f"segment {name} is not a zerogpu snapshot (its header starts {magic!r}, not {MAGIC!r}): "
                            f"it is still being written or was made by something else; pack the weights again")
    if version != VERSION:
        raise SnapshotError(f"snapshot {name} has format version {version}; this zerogpu reads version {VERSION}: "
                            f"pack it again with this version of zerogpu")
    if HEADER.size + manifest_length > data_offset or data_offset + nbytes > len(segment):
        raise SnapshotError(f"snapshot {name} is truncated or its header is corrupt: the segment has {len(segment)} "
                            f"bytes, its header asks for {data_offset + nbytes}; pack it again")
    manifest = segment[HEADER.size:HEADER.size + manifest_length]
    if zlib.crc32(manifest) != checksum:
        raise SnapshotError(f"the manifest of snapshot {name} is corrupt (checksum mismatch): pack it again")
    try:
        entries = [entry_from_json(fields, nbytes) for fields in json.loads(manifest)]
    except (ValueError, TypeError, KeyError) as error:
        raise SnapshotError(f"the manifest of snapshot {name} is corrupt ({error}): pack it again") from None
    if len({entry.name for entry in entries}) != len(entries):
        raise SnapshotError(f"the manifest of snapshot {name} is corrupt (a name appears twice): pack it again")
    return data_offset, nbytes, entries


def entry_from_json(fields: dict, nbytes: int) -> Entry:
    """An Entry from its manifest form; ValueError when it could not be a view of the data region."""
    entry = Entry(
        name=fields["name"], dtype=DTYPES[fields["dtype"]], shape=tuple(fields["shape"]),
        stride=tuple(fields["stride"]), storage_offset=fields["storage_offset"],
        offset=fields["offset"], nbytes=fields["nbytes"])
    numbers = (*entry.shape, *entry.stride, entry.storage_offset, entry.offset, entry.nbytes)
    if not isinstance(entry.name, str) or len(entry.shape) != len(entry.stride) \
            or not all(type(number) is int and number >= 0 for number in numbers):
        raise ValueError(f"entry {fields!r} is malformed")
    if entry.offset + entry.nbytes > nbytes or entry.extent > entry.nbytes:
        raise ValueError(f"entry {entry.name!r} reaches past its storage or the data region")
    return entry


# ---- safetensors files


def read_safetensors_header(path: Path, file: BinaryIO) -> tuple[int, list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]:
    """Where the data starts, and (name, dtype, shape, begin, end) of each tensor in file order."""
    try:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise InvalidArgument(f"{path} is not a safetensors file: it is only {size} bytes long")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise InvalidArgument(f"{path} is not a safetensors file or is truncated: its header claims "
                                  f"{length} bytes, the file has {size}")
        raw = file.read(length)
    except OSError as error:
        raise InvalidArgument(f"cannot read {path}: {error.strerror or error}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"{path} is not a safetensors file: its header is not valid JSON ({error})") from None

    data_size = size - 8 - length
    found = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        found.append(safetensors_entry(path, name, info, data_size))
    found.sort(key=lambda item: item[3])
    return 8 + length, found


def safetensors_entry(path: Path, name: str, info: object, data_size: int
                      ) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
    """One tensor's (name, dtype, shape, begin, end) from a safetensors header, checked."""
    try:
        code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        if not all(type(number) is int and number >= 0 for number in (*shape, begin, end)):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise InvalidArgument(f"{path}: the header entry of {name!r} is malformed: {info!r}") from None
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise InvalidArgument(f"{path}: {name!r} has dtype {code!r}, which torch cannot hold or safetensors does "
                              f"not define; known: {', '.join(sorted(SAFETENSORS_DTYPES))}")
    shape = tuple(shape)
    if dtype in PAIRED:
        if not shape or shape[-1] % 2:
            raise InvalidArgument(f"{path}: {name!r} is {code} with shape {list(shape)}; its last dimension must be "
                                  f"even (torch stores these values in pairs)")
        shape = (*shape[:-1], shape[-1] // 2)
    expected = dtype.itemsize * math.prod(shape)
    if end - begin != expected or end > data_size:
        raise InvalidArgument(f"{path}: {name!r} ({code} {list(shape)}) needs {expected} bytes but its offsets "
                              f"[{begin}, {end}] span {end - begin} within {data_size} bytes of data: "
                              f"the file is corrupt or truncated")
    return name, dtype, shape, begin, end


__all__ = ["Snapshot", "Entry", "sweep"]
