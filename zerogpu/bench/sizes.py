"""The sizes the bench plans with, before torch is imported: the model's shape and the read buffers'."""

from __future__ import annotations

import os

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
WIDTH = 2048  # layer width: 16 MiB of weights per layer, as in a mid-sized transformer
# The `spaces` loader reads through two pinned buffers of 128 MiB.
BUFFER_BYTES = 128 * MiB
BUFFER_COUNT = 2


def layer_bytes(width: int) -> int:
    return (width * width + width) * 4


def model_shape(size: int) -> tuple[int, int]:
    """Layers and width of the model nearest `size` bytes; narrower layers for small sizes."""
    width = WIDTH
    while width > 64 and layer_bytes(width) > size:
        width //= 2
    return max(1, round(size / layer_bytes(width))), width
