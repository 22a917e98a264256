"""Writing behind: an app's ledger keeps the calls of unlimited accounts in memory and writes them in batches.

Each test runs on both engines (a SQLite file and a real PostgreSQL
database). `behind` is the app's ledger (write_behind=True), whose writer
thread is slowed down so that the tests say when it writes; `other` is a
second ledger on the same place, as another process (zerogpu status) sees it.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from zerogpu.errors import SchedulerError
from zerogpu.identity import Identity
from zerogpu.schedule.ledger import open_ledger
from zerogpu.schedule import quota
from zerogpu.schedule.quota import LedgerUnreachable, this_process
from zerogpu.schedule.scheduler import EmbeddedScheduler
from zerogpu.schedule.write_behind import Batch, Charge
from conftest import wait_until

APP = Identity("my-app", "app")  # no daily quota by default
FREE = Identity("ada", "free")


@pytest.fixture
def behind(place, monkeypatch):
    monkeypatch.setattr(quota, "WRITE_BEHIND", 3600.0)
    opened = open_ledger(place, write_behind=True, lease_timeout=3600.0)
    yield opened
    opened.close()


@pytest.fixture
def other(place):
    opened = open_ledger(place)
    yield opened
    opened.close()


def used(ledger, identity=APP) -> float:
    return ledger.balance(identity).used


def rows(ledger) -> set[int]:
    return {row.id for row in ledger.reservations()}


def test_unlimited_calls_wait_for_the_write_and_limited_ones_do_not(behind, other):
    app_call, left = behind.admit(APP, 60, "large", this_process())
    free_call, _ = behind.admit(FREE, 60, "large", this_process())
    assert left == float("inf")
    assert rows(other) == {free_call}  # the limited call's reservation is written as it is admitted
    behind.settle(app_call, 5)
    behind.settle(free_call, 7)
    assert (used(other), used(other, FREE)) == (0, 7)
    behind.write_behind()
    assert (used(other), used(other, FREE)) == (5, 7)
    assert rows(other) == set()  # the unlimited call ended before the write: it never was a row


def test_a_call_running_at_the_write_becomes_a_row_and_ends_as_one(behind, other):
    lease_id, _ = behind.admit(APP, 60, "xlarge", this_process(), device=1, slot=None)
    behind.write_behind()
    (row,) = other.reservations()
    assert (row.id, row.identity, row.holder, row.device, row.cost) == (lease_id, APP, "embedded", 1, 120)
    assert other.balance(APP).reserved == 120
    behind.settle(lease_id, 10)
    assert rows(other) == set() and used(other) == 20  # xlarge: twice the seconds


def test_this_process_reads_what_it_kept_behind(behind):
    first, _ = behind.admit(APP, 60, "large", this_process())
    behind.settle(first, 5)
    running, _ = behind.admit(APP, 60, "large", this_process())
    assert used(behind) == 5 and behind.balance(APP).reserved == 60
    assert rows(behind) == {running}
    assert [b.identity for b in behind.balances()] == [APP]
    behind.settle(running, 3)
    assert behind.reset() == 1 and used(behind) == 0  # a reset forgets the charges kept behind too


def test_a_queued_call_placed_before_the_write_is_written_where_it_runs(behind, other):
    lease_id, _ = behind.admit(APP, 60, "large", this_process())
    behind.place(lease_id, 0, 1, new_id=77)
    behind.write_behind()
    (row,) = other.reservations()
    assert (row.id, row.device, row.slot) == (77, 0, 1)
    behind.settle(77, 4)
    assert rows(other) == set() and used(other) == 4


def test_the_writer_thread_writes_without_being_asked(place, other):
    ledger = open_ledger(place, write_behind=True)  # every WRITE_BEHIND (1) second
    try:
        lease_id, _ = ledger.admit(APP, 60, "large", this_process())
        ledger.settle(lease_id, 5)
        assert wait_until(lambda: used(other) == 5)
    finally:
        ledger.close()


def test_a_batch_written_twice_counts_once(behind, other):
    # A write whose answer is lost is tried again: its charge has one ticket, its row is the same row.
    lease_id, _ = behind.admit(APP, 60, "large", this_process())
    row = behind._mine[lease_id]
    batch = Batch([row], [Charge(12345, APP, row.day, 5.0)])
    assert behind._write_batch(batch, row.expires) == set()
    assert behind._write_batch(batch, row.expires) == set()
    assert used(other) == 5 and rows(other) == {lease_id}
    behind.settle(lease_id, None)


def test_a_row_whose_id_another_holds_stays_behind(behind, other):
    theirs, _ = other.admit(FREE, 60, "large", this_process(), lease_id=42)
    mine, _ = behind.admit(APP, 60, "large", this_process(), lease_id=42)
    behind.write_behind()
    assert [row.identity for row in other.reservations()] == [FREE]
    behind.settle(mine, 3)
    behind.write_behind()
    assert [row.identity for row in other.reservations()] == [FREE]  # their row is still theirs
    assert used(other) == 3
    other.settle(theirs, None)


@pytest.mark.parametrize("committed", [False, True], ids=["failed", "answer lost"])
def test_a_failed_write_loses_nothing_and_counts_nothing_twice(behind, other, monkeypatch, committed):
    ended, _ = behind.admit(APP, 60, "large", this_process())
    behind.settle(ended, 5)
    running, _ = behind.admit(APP, 60, "large", this_process())
    engine_write = behind._write_batch

    def failing(batch, expires):
        if committed:  # it went through, but its answer was lost
            engine_write(batch, expires)
        raise LedgerUnreachable("the server went away")

    monkeypatch.setattr(behind, "_write_batch", failing)
    with pytest.raises(SchedulerError, match="the server went away"):
        behind.write_behind()
    monkeypatch.setattr(behind, "_write_batch", engine_write)
    assert (used(other), rows(other)) == ((5, {running}) if committed else (0, set()))
    behind.settle(running, 2)  # a row the failed write may have written is ended in the ledger
    behind.write_behind()  # the failed batch again: its charge counts once
    assert used(other) == 7 and rows(other) == set()


def test_what_the_ledger_refuses_alone_is_dropped_and_the_rest_written(behind, other, monkeypatch, caplog):
    bad = Identity("bad", "app")
    engine_write = behind._write_batch

    def refusing(batch, expires):
        if any(charge.identity == bad for charge in batch.charges):
            raise SchedulerError("the ledger refuses this user")
        return engine_write(batch, expires)

    monkeypatch.setattr(behind, "_write_batch", refusing)
    for identity, seconds in ((APP, 5), (bad, 3)):
        lease_id, _ = behind.admit(identity, 60, "large", this_process())
        behind.settle(lease_id, seconds)
    running, _ = behind.admit(APP, 60, "large", this_process())
    with caplog.at_level(logging.ERROR, logger="zerogpu.schedule.quota"):
        behind.write_behind()
    assert "the charge of 3 s to 'bad' could not be written" in caplog.text
    assert used(other) == 5 and used(other, bad) == 0 and rows(other) == {running}
    behind.settle(running, 1)
    behind.write_behind()  # nothing of the refused charge is left to block this one
    assert used(other) == 6 and rows(other) == set()


def test_a_read_goes_on_when_the_write_before_it_fails(behind, monkeypatch, caplog):
    lease_id, _ = behind.admit(FREE, 60, "large", this_process())
    behind.settle(lease_id, 4)

    def unreachable(batch, expires):
        raise LedgerUnreachable("the server is gone")

    monkeypatch.setattr(behind, "_write_batch", unreachable)
    held, _ = behind.admit(APP, 60, "large", this_process())
    with caplog.at_level(logging.WARNING, logger="zerogpu.schedule.quota"):
        assert used(behind, FREE) == 4
    assert "read without them" in caplog.text
    behind.settle(held, None)


def test_a_closed_ledger_admits_nothing_more(behind):
    behind.close()
    with pytest.raises(SchedulerError, match="closed"):
        behind.admit(APP, 60, "large", this_process())


def test_calls_ending_and_moving_while_writes_fail_leave_no_row_and_count_once(behind, other, monkeypatch):
    """Threads admit, place and end calls while a writer writes, one write in three failing before or
    after its commit (an answer lost): in the end no reservation is left and every second counts once."""
    engine_write = behind._write_batch
    chance = random.Random(7)

    def unreliable(batch, expires):
        fault = chance.randrange(3)
        if fault == 0:
            raise LedgerUnreachable("the server is gone")
        refused = engine_write(batch, expires)
        if fault == 1:
            raise LedgerUnreachable("the answer was lost")
        return refused

    monkeypatch.setattr(behind, "_write_batch", unreliable)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            try:
                behind.write_behind()
            except SchedulerError:
                pass

    def caller(index):
        for _ in range(12):
            # Five calls running at once, so that writes find some of them held and take them.
            held = [behind.admit(APP, 60, "large", this_process())[0] for _ in range(5)]
            time.sleep(0.002)
            for n, lease_id in enumerate(held):
                if n % 2:  # a queued call placed: on odd callers under a new id, as a warm worker's
                    moved = lease_id + 1 if index % 2 else lease_id
                    behind.place(lease_id, 0, index, new_id=moved)
                    lease_id = moved
                behind.settle(lease_id, 1)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    stop.set()
    threads[0].join()
    monkeypatch.setattr(behind, "_write_batch", engine_write)
    behind.write_behind()
    assert rows(other) == set()
    assert used(other) == 4 * 12 * 5


def test_an_outage_keeps_the_calls_behind_until_the_server_is_back(postgres_server, postgres_url):
    ledger = open_ledger(postgres_url, write_behind=True)
    try:
        ended, _ = ledger.admit(APP, 60, "large", this_process())
        postgres_server.stop()
        try:
            ledger.settle(ended, 5)  # kept in memory: no server needed
            running, _ = ledger.admit(APP, 60, "large", this_process())
            with pytest.raises(SchedulerError, match="unreachable|cannot reach"):
                ledger.write_behind()
        finally:
            postgres_server.start()
        assert used(ledger) == 5 and rows(ledger) == {running}
        ledger.settle(running, 1)
        assert used(ledger) == 6
    finally:
        ledger.close()


@pytest.mark.parametrize("how", ["settle", "place"])
def test_a_call_that_ends_or_moves_while_its_row_is_written_waits_for_the_write(behind, other, monkeypatch, how):
    lease_id, _ = behind.admit(APP, 60, "large", this_process())
    writing, go = threading.Event(), threading.Event()
    engine_write = behind._write_batch

    def slow(batch, expires):
        writing.set()
        go.wait()
        return engine_write(batch, expires)

    monkeypatch.setattr(behind, "_write_batch", slow)
    writer = threading.Thread(target=behind.write_behind)
    writer.start()
    assert writing.wait(30)
    if how == "settle":
        call = threading.Thread(target=behind.settle, args=(lease_id, 4))
    else:
        call = threading.Thread(target=behind.place, args=(lease_id, 1, 0), kwargs={"new_id": 99})
    call.start()
    try:
        call.join(0.2)
        assert call.is_alive()  # waiting for the write, not racing it
    finally:
        go.set()
        writer.join()
        call.join()
    if how == "settle":
        assert rows(other) == set() and used(other) == 4
    else:
        (row,) = other.reservations()
        assert (row.id, row.device, row.slot) == (99, 1, 0)
        behind.settle(99, None)


HELPER = textwrap.dedent("""
    import atexit, os, sys
    from zerogpu.identity import Identity
    from zerogpu.schedule import quota
    from zerogpu.schedule.ledger import open_ledger
    from zerogpu.schedule.quota import this_process

    APP = Identity("my-app", "app")
    quota.WRITE_BEHIND = 3600.0  # no write but the ones this script makes
    late = []
    # Registered before the ledger's own exit hook, so it runs after it: a call that the app's
    # exit ends (its warm workers, its teardown) after the last write.
    atexit.register(lambda: [ledger.settle(lease_id, 2) for lease_id in late])
    ledger = open_ledger(sys.argv[1], write_behind=True, lease_timeout=3600.0)
    lease_id, _ = ledger.admit(APP, 60, "large", this_process())
    ledger.settle(lease_id, 5)
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            ledger.write_behind()  # the parent's calls: not the child's to write
            sys.exit(0)  # and not at its exit either
        os.waitpid(child, 0)
        other = open_ledger(sys.argv[1])
        print(other.balance(APP).used, flush=True)
        other.close()
    if sys.argv[2] == "late":
        late.append(ledger.admit(APP, 60, "large", this_process())[0])
    # and no close(): the exit writes them
""")


@pytest.mark.parametrize("how, charged", [("exit", 5), ("fork", 5), ("late", 7)])
def test_the_calls_kept_behind_are_written_at_exit_by_their_own_process_only(place, other, how, charged):
    done = subprocess.run([sys.executable, "-c", HELPER, place, how], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if how == "fork":
        assert float(done.stdout) == 0  # nothing written by the child
    assert used(other) == charged  # written once, by the parent's exit
    assert rows(other) == set()


def test_an_apps_embedded_scheduler_writes_behind_and_a_daemons_ledger_does_not(tmp_path, monkeypatch):
    from zerogpu.cuda.devices import emulated_devices
    from zerogpu.schedule.daemon import Daemon

    monkeypatch.setenv("ZEROGPU_DATA_DIR", str(tmp_path))
    app = EmbeddedScheduler(emulated_devices(1))
    daemon = Daemon(str(tmp_path / "daemon.sock"), devices=emulated_devices(1))
    try:
        for ledger, written_at_once in ((app.ledger, False), (daemon.scheduler.ledger, True)):
            lease_id, _ = ledger.admit(APP, 60, "large", this_process())
            reader = open_ledger(tmp_path / "quota.sqlite3")
            try:
                assert (lease_id in rows(reader)) is written_at_once
            finally:
                reader.close()
            ledger.settle(lease_id, None)
    finally:
        app.close()
        daemon.scheduler.close()
