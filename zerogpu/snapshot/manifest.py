"""A snapshot segment's header and manifest: which tensors it holds, and where.

    header | manifest (JSON) | padding to a page | data region

The header is MAGIC, the format VERSION, the CRC-32 and length of the
manifest, and the offset and length of the data region. The manifest holds the
`Entry` of every tensor, field by field: one JSON list per field, so a model of
many tensors costs one short list item per field and tensor, not a record each.
Storages in the data region start on an ALIGN boundary, large ones on a page
(`align_storage`).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zlib
from typing import NamedTuple

import torch

from ..errors import SnapshotError
from ..units import round_up

MAGIC = b"ZGPUSNAP"
VERSION = 2  # 2: the manifest is one list per field
# magic, format version, CRC-32 of the manifest, manifest length, data offset, data length
HEADER = struct.Struct("<8sIIQQQ")

ALIGN = 256  # every storage starts on this boundary: enough for any dtype and vector loads
PAGE = mmap.PAGESIZE
LARGE = 1 << 20  # storages at least this big start on a page boundary

# Names torch gives its dtypes ("float32", "bfloat16", ...). Quantized dtypes are
# left out: their tensors carry scales that are not in the storage.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype) and not str(dtype).startswith(("torch.qint", "torch.quint"))
}


class Entry(NamedTuple):
    """One tensor of the manifest.

    The tensor is `dtype`, `shape` and `stride` over a storage of `nbytes`
    bytes that starts `offset` bytes into the data region, beginning
    `storage_offset` elements into it. Entries with the same `offset` and
    `nbytes` share one storage. A named tuple, not a dataclass: a model has
    thousands of entries, and a tuple is made and unpacked in one step.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    offset: int
    nbytes: int

    def over(self, storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
        """A new tensor of this entry over `storage`, its storage (restored, or in the segment)."""
        return torch.empty(0, dtype=self.dtype, device=device).set_(storage, self.storage_offset, self.shape,
                                                                     self.stride)

    @property
    def extent(self) -> int:
        """Bytes from the start of the storage to the end of the tensor's last element."""
        if any(size == 0 for size in self.shape):
            return 0
        last = self.storage_offset + sum((size - 1) * step for size, step in zip(self.shape, self.stride))
        return (last + 1) * self.dtype.itemsize



def align_storage(cursor: int, nbytes: int) -> int:
    """Where a storage of `nbytes` placed at or after `cursor` of the data region starts."""
    return round_up(cursor, PAGE if nbytes >= LARGE else ALIGN)


FIELDS = Entry._fields
LIMIT = 1 << 63  # torch keeps sizes, strides and offsets in 64-bit signed integers
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def encode(entries: list[Entry]) -> bytes:
    """The manifest of `entries`, as the segment stores it: {field: [its value for each entry]}."""
    columns = dict(zip(FIELDS, zip(*entries))) if entries else {field: [] for field in FIELDS}
    columns["dtype"] = [DTYPE_NAMES[dtype] for dtype in columns["dtype"]]
    return json.dumps(columns, separators=(",", ":")).encode()


def header(manifest: bytes, data_offset: int, nbytes: int) -> bytes:
    """The header of a segment that holds `manifest` and a data region of `nbytes` at `data_offset`."""
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(manifest), len(manifest), data_offset, nbytes)


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
        entries = decode(json.loads(manifest), nbytes)
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise SnapshotError(f"the manifest of snapshot {name} is corrupt ({error}): pack it again") from None
    if len({entry.name for entry in entries}) != len(entries):
        raise SnapshotError(f"the manifest of snapshot {name} is corrupt (a name appears twice): pack it again")
    return data_offset, nbytes, entries


def decode(columns: dict, nbytes: int) -> list[Entry]:
    """The entries of a manifest's columns; ValueError for any that could not be a view of the data region."""
    if not isinstance(columns, dict) or sorted(columns) != sorted(FIELDS):
        raise ValueError(f"its fields are {sorted(columns) if isinstance(columns, dict) else columns!r}, "
                         f"not {sorted(FIELDS)}")
    if not all(type(column) is list for column in columns.values()):
        raise ValueError("a field is not a list")
    if len({len(column) for column in columns.values()}) > 1:
        raise ValueError("its fields list different numbers of entries")
    return [checked(Entry(name, DTYPES[dtype], tuple(shape), tuple(stride), *numbers), nbytes)
            for name, dtype, shape, stride, *numbers in zip(*(columns[field] for field in FIELDS))]


def checked(entry: Entry, nbytes: int) -> Entry:
    """`entry`, or ValueError when it could not be a view of a data region of `nbytes`."""
    numbers = (*entry.shape, *entry.stride, entry.storage_offset, entry.offset, entry.nbytes)
    if not isinstance(entry.name, str) or len(entry.shape) != len(entry.stride) \
            or not all(type(number) is int and 0 <= number < LIMIT for number in numbers) \
            or math.prod(entry.shape) >= LIMIT:
        raise ValueError(f"entry {entry.name!r} is malformed")
    if entry.offset + entry.nbytes > nbytes or entry.extent > entry.nbytes:
        raise ValueError(f"entry {entry.name!r} reaches past its storage or the data region")
    return entry
