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

import array
import ctypes
import errno
import functools
import mmap
import os
import resource
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import posix_ipc
import torch

from . import safetensors_io, segments
from ..cuda.registry import collector_paused
from ..errors import InvalidArgument, SnapshotError
from ..units import describe_size, round_up
from .manifest import HEADER, PAGE, Entry, align_storage, encode, header, read_manifest

Progress = Callable[[int], None]


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
    def pack(cls, tensors: Mapping[str, torch.Tensor], *, progress: Progress | None = None,
             named: bool = True) -> Snapshot:
        """Copy `tensors` into a new segment, each storage once.

        Tensors that share a storage come back sharing one, with the same
        strides and storage offsets. A whole storage is packed even when only a
        small view of it is given (a 10-element slice of a 1 GB weight costs
        1 GB): that keeps every view exact; `.clone()` such views first to
        pack only their elements. `progress(n)` is called as each `n` bytes
        are copied.

        named=False removes the segment's name as soon as it is made: only this
        process and the ones forked from it map it (no `attach`), and nothing is
        ever left in /dev/shm, whatever ends them (SIGKILL too).
        """
        with collector_paused():  # a few objects per tensor, none in a cycle
            items = checked_tensors(tensors)
            entries, copies = layout_storages(items)

        def write(fd: int, data_offset: int) -> None:
            write_copies(fd, copies, data_offset, progress)

        return cls._create(entries, write, named=named)

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
            data_start, found = safetensors_io.read_header(path, file)
            entries = safetensors_io.lay_out(found)

            def write(fd: int, data_offset: int) -> None:
                safetensors_io.copy_data(fd, file, data_start, found, entries, data_offset, progress)

            return cls._create(entries, write)

    @classmethod
    def _create(cls, entries: list[Entry], write: Callable[[int, int], None], *, named: bool = True) -> Snapshot:
        """Make the segment for `entries`, fill its data region with `write(fd, data_offset)`, map it."""
        manifest = encode(entries)
        nbytes = max((entry.offset + entry.nbytes for entry in entries), default=0)
        data_offset = round_up(HEADER.size + len(manifest), PAGE)
        size = data_offset + nbytes
        check_free_space(size)

        name = segments.new_name()
        try:
            shm = segments.create(name, size)
        except (OSError, posix_ipc.Error) as error:
            raise SnapshotError(f"could not create shared-memory segment {name} of {describe_size(size)}: {error}") from error
        try:
            if not named:
                segments.unlink(name)  # its descriptor, then its mapping, keep the memory
            # The data goes in through the file descriptor, not a mapping (see segments.write).
            write(shm.fd, data_offset)
            segments.write(shm.fd, memoryview(manifest), HEADER.size)
            # The header goes last: a segment whose copy failed half-way never looks valid.
            segments.write(shm.fd, memoryview(header(manifest, data_offset, nbytes)), 0)
            segment = mmap.mmap(shm.fd, size)
        except BaseException as error:
            segments.unlink(name)
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
            segment = segments.map_segment(name, HEADER.size, read_only=True)
        except posix_ipc.ExistentialError:
            raise SnapshotError(f"no snapshot named {name}: its owner closed it or exited; pack it again") from None
        except segments.ShortSegment as short:
            raise SnapshotError(f"segment {name} is too short to be a snapshot ({short.size} bytes, the header alone "
                                f"is {HEADER.size}): it was not made by Snapshot.pack; pack the weights again") from None
        except (OSError, posix_ipc.Error) as error:
            raise SnapshotError(f"could not open snapshot {name}: {error}") from error
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
        return self.views(self.region())

    def region(self) -> torch.Tensor:
        """The data region, in host memory, as the 1-D uint8 tensor `views` takes."""
        return self._whole()[self._data_offset:self._data_offset + self.nbytes]

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors rebuilt over `buffer`: any 1-D uint8 tensor of `nbytes` on any device
        holding this snapshot's data region (a copy restored to a GPU, for instance)."""
        storages = self.storages(buffer)
        # No torch function mode on the way (a worker's emulation), no collection set off.
        with torch._C.DisableTorchFunction(), collector_paused():
            return {entry.name: entry.over(storage, buffer.device) for entry, storage in zip(self.entries, storages)}

    def storages(self, buffer: torch.Tensor) -> list[torch.UntypedStorage]:
        """The storage of each entry (in the order of `entries`) in `buffer`, a data region as
        `views` takes it; entries that share a storage get the same one."""
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
                or not buffer.is_contiguous() or buffer.numel() != self.nbytes or buffer.is_meta:
            described = (f"a {buffer.dtype} tensor of shape {tuple(buffer.shape)} on {buffer.device}"
                         if isinstance(buffer, torch.Tensor) else f"a {type(buffer).__name__}")
            raise InvalidArgument(f"views() needs a contiguous 1-D torch.uint8 tensor of {self.nbytes} bytes with data "
                                  f"(Snapshot.nbytes); got {described}")
        whole = buffer.untyped_storage()
        start = buffer.storage_offset()
        starts, ends, which = self._distinct_storages
        # A slice of an UntypedStorage is a storage that starts at that byte and keeps the whole
        # one alive, so each rebuilt tensor has its own storage_offset back. (Sliced through the
        # base class: torch's subclass adds a Python frame per slice to refuse meta storages.)
        slice_storage = torch._C.StorageBase.__getitem__
        with collector_paused():
            distinct = [slice_storage(whole, slice(start + first, start + end)) for first, end in zip(starts, ends)]
            return [distinct[index] for index in which]

    @functools.cached_property
    def _distinct_storages(self) -> tuple[array.array, array.array, array.array]:
        """Where each distinct storage starts and ends in the data region, and the index of
        each entry's among them.

        Numbers in arrays, worked out once in the process that packed: a worker forked
        from it reads them without writing to any object it shares with that process (as
        the refcounts of entries' fields would), so none of their pages is copied.
        """
        starts, ends, which = array.array("q"), array.array("q"), array.array("q")
        seen: dict[tuple[int, int], int] = {}
        for entry in self.entries:
            key = (entry.offset, entry.nbytes)
            index = seen.get(key)
            if index is None:
                index = seen[key] = len(starts)
                starts.append(entry.offset)
                ends.append(entry.offset + entry.nbytes)
            which.append(index)
        return starts, ends, which

    def save_safetensors(self, path: str | os.PathLike) -> None:
        """Write the tensors to a `.safetensors` file, streamed from the segment.

        safetensors cannot express shared storage or strides, so every tensor is
        written as its own contiguous copy (one at a time for those that need one).
        """
        safetensors_io.save(self.entries, self.tensors(), path)


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
    strided = torch.strided
    with torch._C.DisableTorchFunction():
        for name, tensor in tensors.items():
            # One look at the common case (a dense CPU tensor), the full check only for the others.
            if type(name) is str and isinstance(tensor, torch.Tensor) and tensor.is_cpu \
                    and tensor.layout == strided and not (tensor.is_nested or tensor.is_quantized
                                                          or tensor.is_conj() or tensor.is_neg()):
                items.append((name, tensor))
                continue
            check_tensor(name, tensor)
            items.append((name, tensor))
    return items


def check_tensor(name: object, tensor: object) -> None:
    """InvalidArgument saying why `tensor` cannot be packed, if it cannot."""
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


def layout_storages(items: list[tuple[str, torch.Tensor]]) -> tuple[list[Entry], list[tuple[memoryview, int]]]:
    """Place every distinct storage of `items` in the data region.

    Returns the entries and the copies that fill the region: (source bytes,
    destination offset). Storages are told apart by the memory they cover;
    distinct storages over overlapping memory (two torch.frombuffer views of
    one buffer, say) go into one block at the same relative places, so they
    alias after a restore as they did before.
    """
    # One look at each tensor: (name, dtype, shape, stride, storage offset, storage key).
    first_use: dict[tuple[int, int], tuple[int, torch.UntypedStorage]] = {}
    described = []
    with torch._C.DisableTorchFunction():
        for index, (name, tensor) in enumerate(items):
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in first_use:
                first_use[key] = (index, storage)
            described.append((name, tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), key))

    # Merge storages that overlap into blocks (empty ones overlap nothing), then lay the
    # blocks out in the order their tensors came, so the region follows the caller's order.
    # A block: [its first tensor's index, its start, its end, its storages' keys].
    blocks: list[list] = []
    end = 0
    for key in sorted(key for key in first_use if key[1] > 0):
        start, length = key
        if blocks and start < end:
            block = blocks[-1]
            block[0] = min(block[0], first_use[key][0])
            block[2] = end = max(end, start + length)
            block[3].append(key)
        else:
            end = start + length
            blocks.append([first_use[key][0], start, end, [key]])
    blocks += [[first_use[key][0], 0, 0, [key]] for key in first_use if key[1] == 0]
    blocks.sort()

    places: dict[tuple[int, int], int] = {}
    cursor = 0
    for _, base, end, keys in blocks:
        length = end - base
        offset = align_storage(cursor, length)
        for key in keys:
            places[key] = offset + key[0] - base if length else offset
        cursor = offset + length
    # Members of one block copy the bytes they share more than once: rare, and simpler
    # than reading raw memory that no single storage covers. (The views are valid while
    # the tensors live: the pack's `items` hold them until the copies are written.)
    copies = list(zip(memory_views(list(places)), places.values()))

    entries = [Entry(name, dtype, shape, stride, storage_offset, places[key], key[1])
               for name, dtype, shape, stride, storage_offset, key in described]
    return entries, copies


# Storages smaller than this are written many to one pwritev(2) call, gaps zero-filled:
# one system call per small tensor would make a model of many small tensors slow to pack.
SMALL_COPY = 1 << 20
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
ZEROS = memoryview(bytes(PAGE))


def write_copies(fd: int, copies: list[tuple[memoryview, int]], data_offset: int,
                 progress: Progress | None) -> None:
    """Write each (source, offset) of `copies` at data_offset + offset of the segment."""
    run: list[memoryview] = []
    run_start = run_end = run_data = 0

    def flush() -> None:
        nonlocal run_data
        if run:
            size = run_end - run_start
            done = os.pwritev(fd, run, data_offset + run_start)
            if done < size:  # a short write: the rest one piece at a time
                segments.write(fd, memoryview(b"".join(run))[done:], data_offset + run_start + done)
            if progress is not None:
                progress(run_data)
            run.clear()
            run_data = 0

    for source, offset in sorted(copies, key=lambda copy: copy[1]):
        gap = offset - run_end
        if len(source) >= SMALL_COPY or not run or gap < 0 or gap > len(ZEROS) or len(run) + 2 > IOV_MAX:
            flush()
            if len(source) >= SMALL_COPY or gap < 0:
                segments.write(fd, source, data_offset + offset, progress)
                run_end = offset + len(source)
                continue
            run_start = run_end = offset
            gap = 0
        if gap:
            run.append(ZEROS[:gap])
        if len(source):
            run.append(source)
        run_data += len(source)
        run_end = offset + len(source)
    flush()


def memory_views(extents: list[tuple[int, int]]) -> list[memoryview]:
    """A view of each (address, length) of this process's memory (CPU storages), without
    copying: valid while what lies there lives.

    All are slices of one view that spans them, which for a model of many small tensors
    costs a tenth of a ctypes array for each. The span also covers memory between them
    that may not even be mapped; only the slices are ever read.
    """
    used = [(address, length) for address, length in extents if length]
    if not used:
        return [memoryview(b"") for _ in extents]
    low = min(address for address, _ in used)
    high = max(address + length for address, length in used)
    span = memoryview((ctypes.c_char * (high - low)).from_address(low)).cast("B")
    return [span[address - low:address - low + length] for address, length in extents]



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

__all__ = ["Snapshot", "Entry", "sweep"]
