"""Safetensors files: read one straight into a snapshot's segment, write a snapshot out as one.

A safetensors file is an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the data. It has no
shared storage and no strides: every tensor is its own contiguous run.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from . import segments
from ..errors import InvalidArgument, SnapshotError
from .manifest import Entry, align_storage

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

Found = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, begin, end in the data


def lay_out(found: list[Found]) -> list[Entry]:
    """The entries of a snapshot holding the tensors `found` in a file, each its own storage, in file order."""
    entries: list[Entry] = []
    cursor = 0
    for name, dtype, shape, begin, end in found:
        offset = align_storage(cursor, end - begin)
        stride = torch.empty(shape, device="meta").stride()
        entries.append(Entry(name, dtype, shape, stride, 0, offset, end - begin))
        cursor = offset + end - begin
    return entries


def copy_data(fd: int, file: BinaryIO, data_start: int, found: list[Found], entries: list[Entry],
              data_offset: int, progress: Callable[[int], None] | None) -> None:
    """Copy each tensor `found` in `file` to its entry's place in the segment open as `fd`."""
    for entry, (_, _, _, begin, _) in zip(entries, found):
        send_bytes(fd, file.fileno(), data_start + begin, data_offset + entry.offset, entry.nbytes, progress)


def send_bytes(fd: int, source_fd: int, source_offset: int, offset: int, nbytes: int,
               progress: Callable[[int], None] | None) -> None:
    """Copy `nbytes` of a file into the segment inside the kernel (sendfile), reporting progress."""
    os.lseek(fd, offset, os.SEEK_SET)
    for start in range(0, nbytes, segments.CHUNK):
        length = min(segments.CHUNK, nbytes - start)
        done = 0
        while done < length:
            sent = os.sendfile(fd, source_fd, source_offset + start + done, length - done)
            if sent == 0:
                raise SnapshotError("the file ended early: it shrank while it was being read")
            done += sent
        if progress is not None:
            progress(length)


def save(entries: list[Entry], tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `tensors` (a snapshot's, one per entry) to a `.safetensors` file at `path`.

    Every tensor is written as its own contiguous copy (one at a time for
    those that need one); the file appears whole or not at all.
    """
    codes = []
    for entry in entries:
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
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    cursor = 0
    for entry, code in zip(entries, codes):
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
            for entry in entries:
                # contiguous() returns contiguous tensors as they are: their bytes are
                # written straight from the segment.
                flat = tensors[entry.name].contiguous().reshape(-1).view(torch.uint8)
                file.write(flat.numpy())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read_header(path: Path, file: BinaryIO) -> tuple[int, list[Found]]:
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


def safetensors_entry(path: Path, name: str, info: object, data_size: int) -> Found:
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
