"""zerogpu's POSIX shared-memory segments: their names, and the sweep of those left behind.

Every segment is /dev/shm/zerogpu-<pid>-<kind><hex>, <pid> being the process
that made it (its owner) and <kind> empty for a snapshot or "msg" for a
tensor on its way between a caller and its worker. The owner unlinks its
segments; when a process dies first, whoever finds its segments removes them.
"""

from __future__ import annotations

import os
import re
import secrets

import posix_ipc
import psutil

SHM_DIR = "/dev/shm"
KINDS = ("", "msg")
NAME = re.compile(r"/?(zerogpu-(\d+)-(msg|)([0-9a-f]+))")


def new_name(kind: str = "") -> str:
    """A fresh name owned by this process, as it appears in /dev/shm (no leading slash)."""
    return f"zerogpu-{os.getpid()}-{kind}{secrets.token_hex(8)}"


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
    """Unlink the segments whose owner is dead; return their names.

    A pid from another pid namespace sharing this /dev/shm looks dead from
    here: share /dev/shm only between processes that see each other.
    """
    removed = []
    for name, owner, _ in listed():
        if psutil.pid_exists(owner):
            continue
        try:
            if unlink(name):
                removed.append(name)
        except posix_ipc.PermissionsError:
            continue  # another user's
    return removed


def free_space() -> tuple[int, int]:
    """(free, total) bytes of /dev/shm."""
    stat = os.statvfs(SHM_DIR)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
