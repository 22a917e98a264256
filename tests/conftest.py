"""Fixtures shared by every test: nothing a test starts may outlive it, and one emulated environment."""

from __future__ import annotations

import os
import secrets
import time

import psutil
import pytest

SHM_DIR = "/dev/shm"


# Every segment this test run makes (its processes, their workers, the CLI's subprocesses)
# starts its random part with this tag: segments of other zerogpu processes of the machine
# (a developer's apps, another checkout's tests) are none of the leak check's business.
RUN_TAG = secrets.token_hex(4)
os.environ["ZEROGPU_SEGMENT_TAG"] = RUN_TAG


def zerogpu_segments() -> set[str]:
    """Segments made by this test run."""
    mine = set()
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return mine
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "zerogpu" or not parts[1].isdigit():
            continue
        if parts[2].removeprefix("msg").startswith(RUN_TAG):
            mine.add(name)
    return mine


def live_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a child process or a shared-memory segment behind."""
    before = zerogpu_segments()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    # Give processes that were killed at the very end of a test a moment to go.
    deadline = time.monotonic() + 5
    while (children := live_children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for child in children:
        child.kill()
    leaked = zerogpu_segments() - before
    for name in leaked:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not children, f"child processes outlived the test: {[c.pid for c in children]}"
    assert not leaked, f"shared-memory segments outlived the test: {sorted(leaked)}"


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is present, asked of the driver's files, not of CUDA."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_visible():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: the test checks leaks itself")


# -- the emulated environment -------------------------------------------------------------


def emulated_environment(monkeypatch, tmp_path) -> None:
    """The environment of a zerogpu process in the tests: emulated, a private quota file, no faults.

    Quotas are raised so that the many calls of one test never run out; a test
    of quotas sets its own.
    """
    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZEROGPU_QUOTA", "anonymous=100000")
    for name in ("ZEROGPU", "ZEROGPU_SCHEDULER", "ZEROGPU_IDLE_TIMEOUT", "ZEROGPU_EMULATED_FAULTS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpu(tmp_path, monkeypatch):
    """zerogpu enabled in this process on two emulated GPUs; no lease may outlive the test."""
    import zerogpu
    from zerogpu import runtime
    from zerogpu.call.teardown import teardown
    from zerogpu.schedule.choice import scheduler

    emulated_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "2")
    monkeypatch.setenv("ZEROGPU_TIMEOUT_GRACE", "0.3")
    zerogpu.enable()
    try:
        yield zerogpu
        teardown.wait()  # workers that ended their calls, still on their way out
        leases = scheduler().status()["leases"]
        assert not leases, f"leases outlived the test: {leases}"
    finally:
        runtime.disable()
