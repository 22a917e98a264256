"""The bytes of the tensors in a message: one span per sender storage, and tensors rebuilt over them.

A sender storage travels once however many tensors of the message use it:
as the span of its bytes those tensors cover (`StoredSpan`). Each tensor keeps
its byte offset in that storage, so tensors that shared a storage share the
received span (`LoadedSpan`) again once rebuilt (`rebuild_tensor`).
"""

from __future__ import annotations

import torch

from ..errors import SerializationError
from ..units import round_up

# Rebuilt storages are padded to this many bytes and start at a multiple of it, so every
# dtype (complex128 is the widest, 16 bytes) can view them at its natural alignment.
ALIGN = 16


def padded(nbytes: int) -> int:
    """The size of the buffer that holds a span of `nbytes`."""
    return round_up(nbytes, ALIGN)


class StoredSpan:
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
        return (self.lo, self.nbytes, padded(self.nbytes), name)

    def source(self) -> torch.Tensor:
        """The span as a uint8 tensor on the storage's own device (no copy)."""
        flat = torch.empty((0,), dtype=torch.uint8, device=self.storage.device)
        return flat.set_(self.storage, self.lo, (self.nbytes,), (1,))

    def host_bytes(self) -> memoryview:
        return memoryview(self.source().cpu().numpy())


class LoadedSpan:
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


def rebuild_tensor(
    span: LoadedSpan,
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
    """A tensor of the sender, rebuilt as a view of its received span (on the device if `on_device`)."""
    itemsize = dtype.itemsize
    offset, misaligned = divmod(start - span.lo, itemsize)
    reach = extent_of(shape, stride) * itemsize
    if (
        misaligned
        or offset < 0
        or len(shape) != len(stride)
        or any(step < 0 for step in stride)
        or (reach and start + reach > span.lo + span.nbytes)
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


def extent(tensor: torch.Tensor) -> int:
    """Elements from `tensor`'s first to one past its last, in storage order."""
    return extent_of(tuple(tensor.shape), tuple(tensor.stride()))


def extent_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a tensor's first to one past its last, in storage order."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))

