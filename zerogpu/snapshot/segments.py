"""zerogpu's POSIX shared-memory segments: their names, and the sweep of those left behind.

Every segment is /dev/shm/zerogpu-<pid>-<kind><hex>, <pid> being the process
that made it (its owner) and <kind> empty for a snapshot or "msg" for a
tensor on its way between a caller and its worker. The owner unlinks its
segments; when a process dies first, whoever finds its segments removes them.

A pid says little where /dev/shm is shared between pid namespaces (pods with a
shared memory volume, `docker run --ipc=host`): another namespace's live owner
looks dead from here. So the owner also holds a shared flock on each segment
from its creation for as long as it has the segment open or mapped (the lock
lives with the open file, which a mapping keeps), and the sweep removes only a
segment whose lock it can take. A message segment is unlocked once written,
on its way to a receiver that unlinks it: the sweep leaves one younger than
MESSAGE_GRACE seconds.

ZEROGPU_SEGMENT_TAG (up to 8 hex digits) starts the random part of every name
this process and its children make, so that one run's segments can be told
from another's (the test suite's leak check).

Segments are made with `create`, filled through their descriptor with `write`
and read with `map_segment`.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import time
from collections.abc import Callable

import posix_ipc
import psutil

SHM_DIR = "/dev/shm"
KINDS = ("", "msg")
NAME = re.compile(r"/?(zerogpu-(\d+)-(msg|)([0-9a-f]+))")
CHUNK = 64 << 20  # bytes written by one pwrite, and between two progress reports
TAG_ENV = "ZEROGPU_SEGMENT_TAG"
TAG = re.compile(r"[0-9a-f]{0,8}")
# How long an unlocked message segment may wait for its receiver before a sweep removes it.
MESSAGE_GRACE = 60.0


def tag() -> str:
    """The hex digits every new name starts with (ZEROGPU_SEGMENT_TAG); '' when unset or malformed."""
    value = os.environ.get(TAG_ENV, "").lower()
    return value if TAG.fullmatch(value) else ""


def new_name(kind: str = "") -> str:
    """A fresh name owned by this process, as it appears in /dev/shm (no leading slash)."""
    prefix = tag()
    return f"zerogpu-{os.getpid()}-{kind}{prefix}{secrets.token_hex(8)}"


def parse(name: str) -> tuple[str, int, str] | None:
    """(name without its slash, owner pid, kind) of a zerogpu segment name; None for any other."""
    match = NAME.fullmatch(name) if isinstance(name, str) else None
    return None if match is None else (match.group(1), int(match.group(2)), match.group(3))


def listed() -> list[tuple[str, int, str]]:
    """Every zerogpu segment in /dev/shm, parsed."""
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    return [parsed for parsed in map(parse, names) if parsed is not None]


def names_of(pid: int, kind: str | None = None) -> list[str]:
    """Names of the segments process `pid` made (of one kind, if given)."""
    return [name for name, owner, found in listed() if owner == pid and kind in (None, found)]


def unlink(name: str) -> bool:
    """Remove a segment's name (its memory stays until its last mapping goes); False if it was gone."""
    try:
        posix_ipc.unlink_shared_memory("/" + name.lstrip("/"))
    except posix_ipc.ExistentialError:
        return False
    return True


def remove_segments_of(pid: int, kind: str | None = None) -> None:
    """Unlink what process `pid` made and left: call it once that process is gone."""
    for name in names_of(pid, kind):
        unlink(name)


def sweep() -> list[str]:
    """Unlink the segments whose owner is gone; return their names.

    Gone means: no process of that pid here, and nobody holds the segment's
    lock (an owner in another pid namespace does), and, for a message, written
    more than MESSAGE_GRACE seconds ago.
    """
    removed = []
    for name, owner, kind in listed():
        if psutil.pid_exists(owner):
            continue
        if abandoned(name, kind) and unlink(name):
            removed.append(name)
    return removed


def abandoned(name: str, kind: str) -> bool:
    """Whether nobody holds segment `name`: its lock can be taken (and a message is old)."""
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone already, or another user's
    try:
        if kind == "msg" and time.time() - os.fstat(fd).st_mtime < MESSAGE_GRACE:
            return False  # on its way to its receiver
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # its owner holds it
            raise
        return True
    finally:
        os.close(fd)  # and with it the lock taken here


def create(name: str, size: int) -> posix_ipc.SharedMemory:
    """Make segment `name` of `size` bytes, open to this user only; it must not exist yet.

    Raises posix_ipc.Error or OSError when it cannot be made. Fill it with
    `write` and close its descriptor (close_fd()) once done. The segment is
    locked (see the module's doc) until that descriptor and every mapping
    made from it are closed.
    """
    shm = posix_ipc.SharedMemory("/" + name.lstrip("/"), posix_ipc.O_CREX, mode=0o600, size=size)
    fcntl.flock(shm.fd, fcntl.LOCK_SH)  # never blocks: nobody else has it open yet
    return shm


class ShortSegment(ValueError):
    """A segment holds fewer bytes than its reader needs; `size` is what it holds."""

    def __init__(self, name: str, size: int):
        super().__init__(f"segment {name} holds only {size} bytes")
        self.size = size


def map_segment(name: str, least: int = 1, *, read_only: bool = False) -> mmap.mmap:
    """Map the whole of segment `name`, shared (read-only if asked).

    Raises posix_ipc.ExistentialError when there is no such segment, and
    ShortSegment when it holds fewer than `least` bytes (at least one: an
    empty file cannot be mapped).
    """
    shm = posix_ipc.SharedMemory("/" + name.lstrip("/"), read_only=read_only)
    try:
        if shm.size < max(least, 1):
            raise ShortSegment(name, shm.size)
        return mmap.mmap(shm.fd, shm.size, access=mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE)
    finally:
        shm.close_fd()


def write(fd: int, data: memoryview, offset: int = 0, progress: Callable[[int], None] | None = None) -> None:
    """pwrite all of `data` at `offset` of a segment, calling `progress(n)` as each CHUNK is written.

    Through the descriptor, not a mapping: tmpfs fills whole pages without
    zeroing them first or faulting them into this process one by one (about
    twice as fast as copying into a fresh mapping), and a full /dev/shm is an
    ENOSPC error here instead of a SIGBUS on a mapped write. It is also not
    torch's copy, whose OpenMP threads hang in a process forked after its
    parent used them, as a worker is.
    """
    for start in range(0, len(data), CHUNK):
        piece = data[start : start + CHUNK]
        done = 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], offset + start + done)
        if progress is not None:
            progress(len(piece))


def free_space() -> tuple[int, int]:
    """(free, total) bytes of /dev/shm."""
    stat = os.statvfs(SHM_DIR)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
