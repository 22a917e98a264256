"""Pinning on the emulated backend: page-locked as on a GPU, within RLIMIT_MEMLOCK, and a ring of a few chunks."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from zerogpu.cuda import engine as zengine
from zerogpu.cuda.engine import Engine

KiB = 1 << 10
MiB = 1 << 20


def locked() -> int:
    return zengine.emulated_resources()["locked_bytes"]


def locked_in_kernel() -> int:
    """VmLck of this process, in bytes: what the kernel holds locked for it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * KiB
    return 0


@pytest.fixture
def memlock_limit():
    """Sets the soft RLIMIT_MEMLOCK for the test (never above the hard one), and puts it back."""
    previous = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def set_limit(nbytes: int) -> None:
        hard = previous[1]
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (nbytes if hard == resource.RLIM_INFINITY
                                                     else min(nbytes, hard), hard))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_MEMLOCK, previous)


def test_pinned_memory_is_page_locked_and_unlocked_when_freed(memlock_limit):
    memlock_limit(4 * MiB)
    with Engine("emulated") as engine:
        before = locked_in_kernel()
        pinned = engine.alloc_pinned(2 * MiB)
        assert locked() == 2 * MiB
        assert locked_in_kernel() - before >= 2 * MiB
        pinned.free()
        assert locked() == 0
        assert locked_in_kernel() == before


def test_past_rlimit_memlock_pinned_memory_still_works_unlocked(memlock_limit):
    memlock_limit(1 * MiB)
    with Engine("emulated") as engine:
        pinned = engine.alloc_pinned(2 * MiB)  # more than may be locked: allocated, faulted in, not held
        assert locked() == 0
        src = np.random.default_rng(0).integers(0, 256, MiB, dtype=np.uint8)
        dst = np.zeros_like(src)
        engine.restore(src, dst, strategy="register", chunk_bytes=256 * KiB)
        assert np.array_equal(src, dst)
        pinned.free()
    assert locked() == 0


def test_registered_chunks_are_locked_while_they_copy_and_unlocked_after(memlock_limit):
    memlock_limit(4 * MiB)
    with Engine("emulated") as engine:
        src = np.random.default_rng(1).integers(0, 256, 4 * MiB, dtype=np.uint8)
        dst = np.zeros_like(src)
        stats = engine.restore(src, dst, strategy="register", chunk_bytes=512 * KiB)
        assert np.array_equal(src, dst)
        assert stats.register_seconds > 0
        assert locked() == 0


def test_the_staging_ring_is_a_few_chunks_whatever_the_threads(memlock_limit):
    memlock_limit(8 * MiB)
    with Engine("emulated") as engine:
        src = np.random.default_rng(2).integers(0, 256, 16 * MiB, dtype=np.uint8)
        dst = np.zeros_like(src)
        first = engine.restore(src, dst, strategy="staging", chunk_bytes=256 * KiB, threads=32)
        assert np.array_equal(src, dst)
        assert first.setup_seconds > 0
        assert locked() == 8 * 256 * KiB  # 8 slots, not 32 threads x 2
        again = engine.restore(src, dst, strategy="staging", chunk_bytes=256 * KiB, threads=32)
        assert again.setup_seconds == 0  # the ring is reused, not pinned again
    assert locked() == 0
