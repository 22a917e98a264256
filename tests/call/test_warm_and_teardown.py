"""Off the caller's path: a finished worker's teardown, and the one timer that ends idle warm workers."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

import zerogpu
from zerogpu import runtime
from zerogpu.call import teardown as leaving
from zerogpu.call.warm import pool
from zerogpu.schedule.choice import scheduler
from conftest import gone


def held_leases() -> int:
    return len(scheduler().status()["leases"])


def used_seconds() -> float:
    return sum(entry["used"] for entry in scheduler().status()["quota"])



@pytest.fixture
def held_teardown(monkeypatch):
    """The teardown thread waits for `release.set()` before it reaps each worker."""
    release = threading.Event()
    finish = leaving.Teardown._finish

    def held(worker, then):
        release.wait(30)
        finish(worker, then)

    monkeypatch.setattr(leaving.Teardown, "_finish", staticmethod(held))
    yield release
    release.set()
    leaving.teardown.wait()


def test_the_result_comes_before_the_worker_is_reaped_and_the_lease_released(gpu, held_teardown):
    @zerogpu.GPU(duration=20)
    def pid():
        return os.getpid()

    started = time.monotonic()
    worker = pid()
    elapsed = time.monotonic() - started
    assert worker != os.getpid()
    # The caller has its result; the worker is still unreaped and its lease still held.
    assert held_leases() == 1
    assert psutil.pid_exists(worker)
    time.sleep(0.5)
    held_teardown.set()
    leaving.teardown.wait()
    assert held_leases() == 0 and not psutil.pid_exists(worker)
    # Charged for the time until the result, not for the teardown it did not wait for.
    assert 0 < used_seconds() <= elapsed


def test_a_lease_goes_to_the_next_call_only_once_the_last_worker_is_gone(gpu, monkeypatch, held_teardown):
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "1")
    runtime.disable()
    zerogpu.enable()

    @zerogpu.GPU(size="xlarge", duration=20)
    def pid():
        return os.getpid()

    @zerogpu.GPU(size="xlarge", duration=20)
    def alive(other):
        return os.path.exists(f"/proc/{other}")

    first = pid()
    answers = []
    second = threading.Thread(target=lambda: answers.append(alive(first)))
    second.start()
    second.join(0.5)
    assert second.is_alive() and not answers, "the device was handed on before its worker was reaped"
    held_teardown.set()
    second.join(30)
    assert answers == [False]


def test_a_failed_call_is_torn_down_too(gpu):
    @zerogpu.GPU(duration=20)
    def fail():
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        fail()
    leaving.teardown.wait()
    assert held_leases() == 0 and len(leaving.teardown) == 0


def test_parking_and_taking_start_no_thread(gpu, monkeypatch):
    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "30")

    @zerogpu.GPU
    def pid():
        return os.getpid()

    first = pid()  # forks, parks, and starts the timer once
    starts = []
    original = threading.Thread.start

    def counted(thread):
        starts.append(thread.name)
        original(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    assert all(pid() == first for _ in range(30))
    monkeypatch.setattr(threading.Thread, "start", original)
    assert starts == []
    assert [t.name for t in threading.enumerate()].count("zerogpu-warm-timer") == 1
    # Deadlines of taken workers are compacted away, not kept for each call.
    assert len(pool._deadlines) <= 65
    pool.close()


def test_one_timer_ends_each_idle_worker_at_its_own_deadline(gpu, monkeypatch):
    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "60")

    @zerogpu.GPU
    def long_idle():
        return os.getpid()

    @zerogpu.GPU
    def short_idle():
        return os.getpid()

    kept = long_idle()  # parked for 60 s: the timer sleeps until then
    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "0.2")
    ended = short_idle()  # an earlier deadline must wake it
    deadline = time.monotonic() + 20  # a hang guard, not a timing
    while not gone(ended):
        assert time.monotonic() < deadline, "the idle worker with the earlier deadline was not ended"
        time.sleep(0.02)
    while held_leases() > 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not gone(kept) and len(pool) == 1
    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "60")
    assert long_idle() == kept  # still warm
    pool.close()
    assert held_leases() == 0


class Events:
    """A relay of the smallest kind: a call made while `watching` reports to it; in the worker, the
    function finds its `emit` in EMIT."""

    def __init__(self) -> None:
        self.watching = None

    def watch(self):
        return self.watching

    def enter(self, state, emit):
        import contextlib

        EMIT[:] = [emit]
        return contextlib.nullcontext()

    def translate(self, error):
        return None


class Seen:
    identity = None
    state = None

    def __init__(self) -> None:
        self.replayed = []

    def replay(self, payload) -> None:
        self.replayed.append(payload)

    def notice(self, kind) -> None:
        pass


EMIT: list = []


def test_a_thread_left_behind_reports_nothing_into_the_next_call_of_a_warm_worker(gpu, monkeypatch):
    from zerogpu.call import events

    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "60")
    relay = Events()
    monkeypatch.setitem(events._relays, "test-events", relay)

    @zerogpu.GPU(duration=20)
    def reports(leave_one_behind):
        emit = EMIT[0]
        emit("from the call itself")
        if not leave_one_behind:
            time.sleep(0.5)  # longer than the reporter of the call before lives
            return os.getpid()

        def keep_reporting():
            for n in range(3000):  # as fast as it can: it is reporting when the call ends
                emit(f"late {n}")

        threading.Thread(target=keep_reporting, daemon=True).start()
        time.sleep(0.01)  # the reporter runs while the call returns
        return os.getpid()

    first, second = Seen(), Seen()
    try:
        relay.watching = first
        worker = reports(True)
        relay.watching = second
        assert reports(False) == worker  # the same warm worker
    finally:
        pool.close()
    assert first.replayed[0] == "from the call itself"
    assert second.replayed == ["from the call itself"], \
        f"the next call replayed {len(second.replayed) - 1} events of the one before"
