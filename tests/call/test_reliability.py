"""Calls under attack: huge arguments to a stalled worker, detached grandchildren, a worker that
closes its own channel or exhausts its address space, result segments, and SIGTERM to the app.

Each test names the defect it guards against; hang guards are generous and only there so that
a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import gc
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch

import zerogpu
from zerogpu.snapshot import segments
from conftest import gone

HANG_GUARD = 120.0  # seconds; a call that takes this long is hung, however busy the machine


def call_in_thread(fn, *args):
    """Run fn(*args) on a thread; (finished, outcome) after at most HANG_GUARD seconds."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    if thread.is_alive():
        for child in psutil.Process().children(recursive=True):
            child.kill()  # frees the hung call, so the test can fail rather than hang
        thread.join(HANG_GUARD)
        return False, outcome
    return True, outcome



def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG_GUARD
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


# -- the parent's waits are bounded by the call's deadline ------------------------------


def test_a_large_argument_to_a_worker_stalled_in_restore_ends_at_the_deadline(gpu, monkeypatch):
    model = torch.nn.Linear(64, 64).to("cuda")  # noqa: F841 - kept alive, so it is restored
    zerogpu.startup()
    monkeypatch.setenv("ZEROGPU_EMULATED_FAULTS", "hang_after_bytes=0")

    @zerogpu.GPU(duration=1)
    def never_runs(blob):
        return len(blob)

    # Far more than a socket's buffer, and bytes, not a tensor: it goes through the socket.
    finished, outcome = call_in_thread(never_runs, b"x" * (50 << 20))
    assert finished, "the call hung past its deadline while sending its arguments"
    assert isinstance(outcome.get("error"), zerogpu.RestoreError), outcome


@pytest.mark.parametrize("started", [True, False], ids=["after-the-thread-started", "before-it-started"])
def test_an_interrupt_while_a_large_argument_starts_sending_releases_the_channel_once(monkeypatch, started):
    import socket

    from zerogpu.call.channel import Channel
    from zerogpu.call.worker import SEND_AT_ONCE, Worker

    left, right = socket.socketpair()
    worker = Worker(pid=os.getpid(), channel=Channel(left), pidfd=-1, key="k")
    start = threading.Thread.start

    def interrupted(thread):
        # Ctrl-C lands in Thread.start: once the new thread runs (it may finish first), or before.
        if started:
            start(thread)
            thread.join()
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    payload = b"x" * (SEND_AT_ONCE + 1)
    with pytest.raises(KeyboardInterrupt):  # and no "release unlocked lock" in its place
        worker.send_bytes(payload)
    monkeypatch.undo()
    assert worker._sending.acquire(blocking=False), "the channel stays taken after the interrupt"
    worker._sending.release()
    if started:
        assert Channel(right).recv_bytes(timeout=5) == payload
    left.close()
    right.close()


def test_a_lease_taken_back_before_its_call_had_a_worker_ends_the_call_with_nothing_left(gpu, monkeypatch, tmp_path):
    from zerogpu.schedule.choice import scheduler

    # A scheduler that takes each lease back as soon as it is given (the node daemon's "expired"
    # arriving before the call has handed itself to a worker).
    monkeypatch.setattr(scheduler(), "on_reclaim", lambda lease, callback: callback(), raising=False)
    ran = tmp_path / "ran"

    @zerogpu.GPU(duration=5)
    def never_runs():
        ran.write_text("ran")

    children = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(zerogpu.CallTimeout, match="took its GPU back, so its worker was killed"):
        never_runs()
    assert not ran.exists()
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= children
    # (the gpu fixture checks that no lease outlived the call)


# -- nothing a worker starts outlives its call ------------------------------------------


DETACH = """
def detach(ignore_term):
    import os, signal, time
    read, write = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            if ignore_term:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(write, str(os.getpid()).encode())
            time.sleep(600)
        os._exit(0)
    os.close(write)
    return int(os.read(read, 64))
"""


@pytest.mark.parametrize("ignore_term", [False, True], ids=["detached", "ignoring-sigterm"])
def test_a_detached_grandchild_does_not_outlive_the_call(gpu, ignore_term):
    namespace: dict = {}
    exec(DETACH, namespace)
    detach = zerogpu.GPU(namespace["detach"])
    grandchild = detach(ignore_term)
    try:
        assert wait_gone(grandchild), f"process {grandchild}, started by the call, outlived it"
    finally:
        if not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_detached_grandchild_of_a_killed_worker_goes_with_it(gpu, tmp_path):
    marker = tmp_path / "grandchild"

    @zerogpu.GPU(duration=1)
    def detach_then_hang():
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                marker.write_text(str(os.getpid()))
                time.sleep(600)
            os._exit(0)
        while True:
            time.sleep(1)

    with pytest.raises(zerogpu.CallTimeout):
        detach_then_hang()
    grandchild = int(marker.read_text())
    try:
        assert wait_gone(grandchild), f"process {grandchild} outlived its killed worker"
    finally:
        if not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# -- a crash says what happened ----------------------------------------------------------


def test_a_worker_that_closes_its_channel_is_not_blamed_on_memory(gpu):
    @zerogpu.GPU
    def closes_its_channel():
        for name in os.listdir("/proc/self/fd"):
            try:
                if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                    os.close(int(name))
            except OSError:
                pass
        time.sleep(600)

    with pytest.raises(zerogpu.WorkerCrashed) as caught:
        closes_its_channel()
    assert "closed its channel" in str(caught.value)
    assert "out of memory" not in str(caught.value)


def test_a_worker_at_its_address_space_limit_ends_promptly_with_memory_error(gpu):
    @zerogpu.GPU(duration=600)
    def exhausts():
        import resource

        # A cap of 1 GiB more than it maps now (4 GiB in the field), so that filling it is quick.
        with open("/proc/self/status") as status:
            mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, mapped + 2**30))
        chunks = []
        while True:
            chunks.append(bytearray(16 << 20))

    finished, outcome = call_in_thread(exhausts)
    assert finished, "a worker out of address space ran until its deadline"
    error = outcome.get("error")
    assert isinstance(error, (MemoryError, zerogpu.WorkerCrashed)), outcome
    if isinstance(error, zerogpu.WorkerCrashed):
        assert "memory" in str(error)


# -- result segments go with their tensors --------------------------------------------------


def message_mappings() -> int:
    """Mappings and descriptors of this process that belong to message segments."""
    count = 0
    with open("/proc/self/maps") as maps:
        count += sum(1 for line in maps if "/zerogpu-" in line and "-msg" in line)
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        count += "/zerogpu-" in target and "-msg" in target
    return count


def test_a_large_result_is_unmapped_when_its_tensor_is_dropped(gpu):
    @zerogpu.GPU
    def large():
        return torch.ones(2 << 20)  # 8 MB: through a segment

    gc.collect()
    before = message_mappings()
    gc.disable()
    try:
        for _ in range(5):
            result = large()
            assert result.sum().item() == 2 << 20
            del result
        assert message_mappings() == before, "result segments stay mapped until the garbage collector runs"
    finally:
        gc.enable()


# -- however an app ends, its snapshot leaves nothing in /dev/shm ----------------------------------


APP = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    import zerogpu
    if sys.argv[1] == "own-handler":
        def handler(signum, frame):
            open(sys.argv[2], "w").write(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, handler)
    zerogpu.enable()
    model = torch.nn.Linear(256, 256).to("cuda")
    zerogpu.startup()

    @zerogpu.GPU
    def total():
        return float(model.weight.sum())

    # The weights are in shared memory (a segment mapped here, its name already gone), and a
    # worker forked from here reads them.
    mapped = sum(" /dev/shm/zerogpu-" in line and line.endswith("(deleted)\\n") for line in open("/proc/self/maps"))
    print(mapped, total() == float(model.weight.sum()), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("signum, handler", [(signal.SIGTERM, "none"), (signal.SIGHUP, "none"),
                                             (signal.SIGTERM, "own-handler"), (signal.SIGKILL, "none")])
def test_an_app_leaves_no_snapshot_in_dev_shm_however_it_ends(tmp_path, signum, handler):
    env = {**os.environ, "ZEROGPU_BACKEND": "emulated", "ZEROGPU_DATA_DIR": str(tmp_path / "data")}
    marker = tmp_path / "handled"
    app = subprocess.Popen([sys.executable, "-c", APP, handler, str(marker)], env=env,
                           stdout=subprocess.PIPE, text=True)
    try:
        mapped, same = app.stdout.readline().split()
        assert int(mapped) >= 1 and same == "True", "the app packed no snapshot, or its worker did not read it"
        assert segments.names_of(app.pid) == []  # unlinked once packed: SIGKILL cannot leave it behind
        app.send_signal(signum)
        status = app.wait(HANG_GUARD)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        app.stdout.close()
    left = segments.names_of(app.pid)
    for name in left:
        segments.unlink(name)
    assert not left, f"{signal.Signals(signum).name} left {left} in /dev/shm"
    if handler == "own-handler":
        assert marker.read_text() == str(int(signum))  # the app's own handler still ran
        assert status == 0
    else:
        assert status == -signum  # and the app still ends as that signal ends it


FORKING_APP = textwrap.dedent("""
    import multiprocessing, os, signal
    import torch
    import zerogpu
    from zerogpu import runtime
    zerogpu.enable()

    def handler():
        return "zerogpu" if signal.getsignal(signal.SIGTERM) is runtime._terminated else "app"

    @zerogpu.GPU
    def total(x):
        return float(x.sum())

    with multiprocessing.get_context("fork").Pool(2) as pool:
        in_pool = pool.apply(handler)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        before = handler()
        called = total(torch.ones(3, device="cuda"))
        os.write(write, f"{before} {handler()} {called}".encode())
        os._exit(0)
    os.waitpid(child, 0)
    print(handler(), in_pool, os.read(read, 100).decode(), flush=True)
""")


def test_a_child_the_app_forks_gets_the_apps_signal_handlers_until_it_calls():
    # A multiprocessing pool's worker that inherited zerogpu's SIGTERM handler (Python code) could
    # miss pool.terminate()'s signal while entering its queue's lock, and the pool's exit hung.
    env = {**os.environ, "ZEROGPU_BACKEND": "emulated"}
    done = subprocess.run([sys.executable, "-c", FORKING_APP], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    parent, in_pool, child_before, child_after, called = done.stdout.split()
    assert (parent, in_pool) == ("zerogpu", "app")
    assert (child_before, child_after, called) == ("app", "zerogpu", "3.0")
