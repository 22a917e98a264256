"""Large storages of a message through shared memory rather than the socket.

The sender copies a span straight from its device into a fresh segment whose
name is all the message carries; the receiver maps the segment and keeps the
mapping as the storage, so a 1 GB result costs one copy into the segment and
none out of it. The receiver unlinks the name (messages.loads does, before
anything else).
"""

from __future__ import annotations

import mmap
import os

import posix_ipc
import torch

from ..errors import SerializationError
from ..snapshot import segments
from .storages import StoredSpan, padded


def copy_to_segment(span: StoredSpan) -> str:
    """Copy a span into a new segment straight from its device; return the segment's name."""
    size = padded(span.nbytes)
    name = "/" + segments.new_name("msg")
    try:
        segment = segments.create(name, size)
    except (posix_ipc.Error, OSError) as exc:
        raise SerializationError(
            f"could not create a shared-memory segment of {size} bytes for a tensor: {exc}"
        ) from exc
    try:
        source = span.source()
        if source.device.type == "cpu":
            segments.write(segment.fd, memoryview(source.numpy()))
        else:
            copy_from_device(segment.fd, size, source)
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


def copy_from_device(fd: int, size: int, source: torch.Tensor) -> None:
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


def map_storage(name: str, size: int) -> torch.Tensor:
    """The first `size` bytes of segment `name` as a uint8 tensor whose storage is the segment's memory."""
    try:
        mapping = segments.map_segment(name, size)
    except posix_ipc.ExistentialError as exc:
        raise SerializationError(
            f"the shared-memory segment {name} of a message is gone: was the message loaded twice, "
            "or its segments removed before it was loaded?"
        ) from exc
    except segments.ShortSegment as short:
        raise SerializationError(f"the shared-memory segment {name} holds {short.size} bytes, not {size}") from None
    # The tensor holds the mapping: its storage is the segment's memory, unmapped with it.
    return torch.frombuffer(mapping, dtype=torch.uint8, count=size)
