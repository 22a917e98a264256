"""Segment names, and the sweep of segments whose owner died."""

from __future__ import annotations

import os

import posix_ipc

from zerogpu.snapshot import segments


def make_segment(kind: str) -> str:
    name = segments.new_name(kind)
    posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    return name


def test_names_say_owner_and_kind():
    for kind in segments.KINDS:
        name = segments.new_name(kind)
        assert segments.parse(name) == (name, os.getpid(), kind)
        assert segments.parse("/" + name) == (name, os.getpid(), kind)
    assert segments.parse("zerogpu-12-xyz") is None
    assert segments.parse("other-12-abc") is None
    assert segments.parse(None) is None


def test_sweep_removes_both_kinds_of_a_dead_owner_and_keeps_the_living():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        names = [make_segment(kind) for kind in segments.KINDS]
        os.write(write, "\n".join(names).encode())
        os._exit(0)
    os.close(write)
    dead = os.read(read, 4096).decode().split("\n")
    os.close(read)
    os.waitpid(pid, 0)
    mine = make_segment("")
    try:
        removed = segments.sweep()
        assert sorted(dead) == sorted(set(removed) & set(dead))
        assert segments.names_of(pid) == []
        assert segments.names_of(os.getpid()) == [mine]
    finally:
        segments.unlink(mine)


def test_remove_segments_of_one_kind():
    snapshot, message = make_segment(""), make_segment("msg")
    try:
        segments.remove_segments_of(os.getpid(), "msg")
        assert segments.names_of(os.getpid()) == [snapshot]
    finally:
        segments.unlink(snapshot)
        assert not segments.unlink(message)  # already gone
