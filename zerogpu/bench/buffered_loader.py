"""The `spaces` package's way of loading a model: the weights read per call from a file on disk
through two buffers, one filling while the other is copied to the device."""

from __future__ import annotations

import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..units import round_up
from .sizes import BUFFER_BYTES, BUFFER_COUNT, PAGE



@dataclass(frozen=True)
class FileEntry:
    """Where one tensor's bytes are in the loader's file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class BufferedFileLoader:
    """Weights in a file on disk, read back per call through two buffers while copying to the device.

    This is how ZeroGPU's `spaces` package loads a model into each GPU
    worker (its own code is not used here): each tensor is written to the
    file page-aligned once; a load reads the file in 128 MiB pieces into one
    buffer (with O_DIRECT, bypassing the page cache, where the filesystem
    allows it) while the other buffer's piece is copied to the device. The
    buffers are pinned on a GPU and are made once, not per load, which favours
    this loader a little.
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], backend: str) -> None:
        self.path = path
        self.entries: list[FileEntry] = []
        offset = 0
        with open(path, "wb") as file:
            for name, tensor in tensors.items():
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                file.seek(offset)
                file.write(data.numpy())
                self.entries.append(FileEntry(name, tensor.dtype, tuple(tensor.shape), offset, data.numel()))
                offset = round_up(offset + data.numel(), PAGE)
            # O_DIRECT reads whole pages, so the file ends on one.
            file.truncate(offset)
        self.nbytes = offset
        self.backend = backend
        self.buffers: list[torch.Tensor] = []
        self.direct = False

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Read every tensor into new device memory; returns them by name."""
        if not self.buffers:
            self.buffers = [self._buffer() for _ in range(BUFFER_COUNT)]
        aligned = all(buffer.data_ptr() % PAGE == 0 for buffer in self.buffers)
        fd, self.direct = open_for_reading(self.path, direct=aligned)
        free: queue.Queue = queue.Queue()
        filled: queue.Queue = queue.Queue()
        for buffer in self.buffers:
            free.put(buffer)
        reader = threading.Thread(target=self._read, args=(fd, free, filled), name="bench-reader", daemon=True)
        destinations = {entry.name: torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
                        for entry in self.entries}
        reader.start()
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                buffer, start, length = item
                self._copy_out(buffer, start, length, destinations)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()  # the buffer is read again next
                free.put(buffer)
        finally:
            for _ in self.buffers:
                free.put(None)  # stops a reader still waiting for a buffer
            reader.join()
            os.close(fd)
        return {entry.name: destinations[entry.name].view(entry.dtype).view(entry.shape) for entry in self.entries}

    def _buffer(self) -> torch.Tensor:
        if self.backend == "cuda":
            return torch.empty(BUFFER_BYTES, dtype=torch.uint8, pin_memory=True)
        # An anonymous mapping starts on a page, as O_DIRECT needs.
        return torch.frombuffer(mmap.mmap(-1, BUFFER_BYTES), dtype=torch.uint8)

    def _read(self, fd: int, free: queue.Queue, filled: queue.Queue) -> None:
        try:
            for start in range(0, self.nbytes, BUFFER_BYTES):
                buffer = free.get()
                if buffer is None:
                    return
                length = min(BUFFER_BYTES, self.nbytes - start)
                read_exactly(fd, memoryview(buffer.numpy())[:length], start)
                filled.put((buffer, start, length))
        except BaseException as error:  # noqa: BLE001 - raised again by the copying thread
            filled.put(error)
            return
        filled.put(None)

    def _copy_out(self, buffer: torch.Tensor, start: int, length: int,
                  destinations: dict[str, torch.Tensor]) -> None:
        end = start + length
        for entry in self.entries:
            low, high = max(entry.offset, start), min(entry.offset + entry.nbytes, end)
            if low < high:
                target = destinations[entry.name][low - entry.offset:high - entry.offset]
                target.copy_(buffer[low - start:high - start], non_blocking=True)


def open_for_reading(path: Path, *, direct: bool) -> tuple[int, bool]:
    """A descriptor for reading `path`, with O_DIRECT when asked and the filesystem takes it."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: read through the page cache
    return os.open(path, os.O_RDONLY), False


def read_exactly(fd: int, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count == 0:
            raise EOFError(f"the bench's weight file ended {len(target) - done} bytes early")
        done += count
