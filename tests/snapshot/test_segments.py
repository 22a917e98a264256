"""Segment names, and the sweep of segments whose owner died."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import textwrap
import time

import posix_ipc
import pytest

from zerogpu.snapshot import segments


def make_segment(kind: str, *, written_ago: float = 0.0) -> str:
    """A segment made as an old zerogpu did (unlocked), last written `written_ago` seconds ago."""
    name = segments.new_name(kind)
    posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    if written_ago:
        then = time.time() - written_ago
        os.utime(os.path.join(segments.SHM_DIR, name), (then, then))
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
        names = [make_segment(kind, written_ago=2 * segments.MESSAGE_GRACE) for kind in segments.KINDS]
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


def test_a_fresh_message_of_a_dead_owner_is_left_to_its_receiver():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    name = f"zerogpu-{pid}-msg{os.urandom(8).hex()}"
    posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    try:
        assert name not in segments.sweep()
        then = time.time() - 2 * segments.MESSAGE_GRACE
        os.utime(os.path.join(segments.SHM_DIR, name), (then, then))
        assert name in segments.sweep()
    finally:
        segments.unlink(name)


def test_a_locked_segment_survives_a_sweep_although_its_pid_looks_dead():
    # An owner this process cannot see (another pid namespace) holds the lock through its mapping.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    name = f"zerogpu-{pid}-{os.urandom(8).hex()}"
    shm = segments.create(name, 4096)
    mapping = mmap.mmap(shm.fd, 4096)
    shm.close_fd()
    try:
        assert name not in segments.sweep()
        mapping.close()  # the owner lets go: now it is abandoned
        assert name in segments.sweep()
    finally:
        mapping.close()
        segments.unlink(name)


SWEEP_IN_A_NEW_PID_NAMESPACE = textwrap.dedent("""
    import os, sys
    from zerogpu.snapshot import segments
    assert os.getpid() == 1, os.getpid()  # this process sees no other
    # Only the test's own: from here every segment of this machine looks ownerless by its pid.
    everything = segments.listed
    segments.listed = lambda: [found for found in everything() if found[0] in sys.argv[1:]]
    print(" ".join(segments.sweep()))
""")


def sweep_in_new_pid_namespace(names: list[str]) -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) from util-linux")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not permit new pid namespaces: {probe.stderr.strip()}")
    done = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", SWEEP_IN_A_NEW_PID_NAMESPACE, *names],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_sweep_in_another_pid_namespace_keeps_a_live_owners_segment():
    # The owner is this process; from inside the new namespace its pid does not exist.
    name = segments.new_name()
    shm = segments.create(name, 4096)
    mapping = mmap.mmap(shm.fd, 4096)
    shm.close_fd()
    gone = make_segment("", written_ago=1)  # made unlocked, by a process that has since died
    gone_dead = gone.replace(f"zerogpu-{os.getpid()}-", "zerogpu-999999999-")
    os.rename(os.path.join(segments.SHM_DIR, gone), os.path.join(segments.SHM_DIR, gone_dead))
    try:
        removed = sweep_in_new_pid_namespace([name, gone_dead])
        assert name not in removed
        assert os.path.exists(os.path.join(segments.SHM_DIR, name))
        # What nobody holds still goes (here or in another zerogpu process's sweep meanwhile).
        assert not os.path.exists(os.path.join(segments.SHM_DIR, gone_dead))
    finally:
        mapping.close()
        segments.unlink(name)
        segments.unlink(gone_dead)


def test_the_run_tag_starts_every_name(monkeypatch):
    monkeypatch.setenv(segments.TAG_ENV, "0a1b2c3d")
    name = segments.new_name("msg")
    assert name.startswith(f"zerogpu-{os.getpid()}-msg0a1b2c3d")
    assert segments.parse(name) == (name, os.getpid(), "msg")
    monkeypatch.setenv(segments.TAG_ENV, "not hex")
    assert segments.parse(segments.new_name()) is not None


def test_the_leak_check_counts_only_this_runs_segments():
    import conftest  # the suite's own fixtures module

    ours = segments.new_name("msg")
    theirs = f"zerogpu-{os.getpid()}-msg{'f' * 8 if not conftest.RUN_TAG.startswith('f') else 'e' * 8}0011223344556677"
    for name in (ours, theirs):
        posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    try:
        found = conftest.zerogpu_segments()
        assert ours in found
        assert theirs not in found  # another run's (or an app's) segment, even of a pid like ours
    finally:
        segments.unlink(ours)
        segments.unlink(theirs)
