"""The quota ledger: admission, charges, days, concurrency, restarts, dead processes, expiry, outages.

Every test that takes `place` (or `ledger`) runs on both engines: a SQLite
file and a database on a real PostgreSQL server (see conftest.py).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import math
import threading

import pytest

from zerogpu.errors import InvalidArgument, QuotaExceeded, SchedulerError
from zerogpu.identity import Identity
from zerogpu.schedule.policy import Policy
from zerogpu.schedule.ledger import open_ledger
from zerogpu.schedule.quota import (
    DAY, Owner, QuotaLedger, clock_time, next_reset, spell_seconds, this_process,
)
from zerogpu.schedule.quota_sqlite import SQLiteLedger

FREE = Identity("ada", "free")
PRO = Identity("grace", "pro")
NOON = 20000 * DAY + DAY / 2  # a fixed UTC noon

ANONYMOUS = Identity("anonymous:192.0.2.1", "anonymous")
APP = Identity("my-app", "app")


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(place, clock):
    opened = open_ledger(place, clock=clock)
    assert isinstance(opened, QuotaLedger)
    yield opened
    opened.close()


def test_defaults_follow_the_published_tiers_and_leave_the_app_unlimited():
    policy = Policy()
    assert dict(policy.daily_quota) == {"anonymous": 120.0, "free": 210.0, "pro": 1500.0, "app": math.inf}
    assert dict(policy.max_duration) == dict(policy.daily_quota)
    assert policy.describe()["daily_quota"]["app"] is None  # JSON has no infinity


def test_overrides_replace_only_the_tiers_named():
    policy = Policy(daily_quota={"pro": 3600}, max_duration={"free": 60})
    assert policy.daily_quota["pro"] == 3600 and policy.daily_quota["free"] == 210
    assert policy.max_duration == {"anonymous": 120, "free": 60, "pro": 3600, "app": math.inf}


@pytest.mark.parametrize("kwargs, message", [
    ({"daily_quota": {"gold": 10}}, "unknown tier 'gold'"),
    ({"daily_quota": {"free": -1}}, "positive number"),
    ({"max_duration": {"pro": float("nan")}}, "positive number"),
    ({"daily_quota": {"app": 0}}, "positive number"),
    ({"large_per_gpu": 0}, "at least 1"),
    ({"aging": 0}, "aging"),
])
def test_bad_policies_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        Policy(**kwargs)


def test_a_call_is_charged_what_it_used(ledger):
    lease_id, left = ledger.admit(FREE, 60, "large", this_process())
    assert left == 210
    assert ledger.balance(FREE).reserved == 60
    assert ledger.settle(lease_id, 12.5) == 12.5
    balance = ledger.balance(FREE)
    assert (balance.used, balance.reserved, balance.left) == (12.5, 0, 197.5)


def test_an_xlarge_second_counts_as_two(ledger):
    lease_id, _ = ledger.admit(PRO, 30, "xlarge", this_process())
    assert ledger.balance(PRO).reserved == 60
    assert ledger.settle(lease_id, 10) == 20
    assert ledger.balance(PRO).used == 20


def test_the_charge_stops_at_the_duration_asked_for(ledger):
    lease_id, _ = ledger.admit(FREE, 10, "large", this_process())
    assert ledger.settle(lease_id, 14.0) == 10
    assert ledger.balance(FREE).used == 10


def test_no_charge_means_none(ledger):
    lease_id, _ = ledger.admit(FREE, 10, "large", this_process())
    assert ledger.settle(lease_id, None) == 0
    assert ledger.balance(FREE).used == 0 and ledger.balance(FREE).reserved == 0


def test_settling_twice_charges_once(ledger):
    lease_id, _ = ledger.admit(FREE, 10, "large", this_process())
    ledger.settle(lease_id, 5)
    assert ledger.settle(lease_id, 5) == 0
    assert ledger.balance(FREE).used == 5


def test_a_bad_used_value_is_refused(ledger):
    lease_id, _ = ledger.admit(FREE, 10, "large", this_process())
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="used must be"):
            ledger.settle(lease_id, bad)
    assert ledger.balance(FREE).reserved == 10


def test_what_running_calls_reserved_counts_against_admission(ledger):
    first, _ = ledger.admit(FREE, 150, "large", this_process())
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(FREE, 100, "large", this_process())
    error = caught.value
    assert (error.requested, error.left) == (100, 60)
    assert error.retry_at == NOON + 150  # the running call has ended by then, and its reservation with it
    message = str(error)
    for part in ("'ada' (free tier) asked for 100 s", "60 s of GPU quota left today",
                 "150 s held by running calls", "of 210 s", "Try again in 0:02:30"):
        assert part in message
    ledger.settle(first, 20)
    ledger.admit(FREE, 100, "large", this_process())


def test_exhausted_quota_comes_back_at_utc_midnight(ledger, clock):
    lease_id, _ = ledger.admit(ANONYMOUS, 120, "large", this_process())
    ledger.settle(lease_id, 120)
    with pytest.raises(QuotaExceeded, match=r"Try again in 12:00:00$") as caught:
        ledger.admit(ANONYMOUS, 1, "large", this_process())
    assert caught.value.left == 0 and caught.value.retry_at == next_reset(NOON)
    clock.now = next_reset(NOON) + 1
    assert ledger.balance(ANONYMOUS).used == 0
    ledger.admit(ANONYMOUS, 120, "large", this_process())


def test_the_apps_own_account_has_no_daily_quota_by_default(ledger):
    for _ in range(6):  # six xlarge calls of a day each, at once: none is refused
        ledger.admit(APP, 86400, "xlarge", this_process())
    balance = ledger.balance(APP)
    assert balance.reserved == 6 * 2 * 86400 and balance.limit == math.inf
    assert balance.describe()["limit"] is None and balance.describe()["left"] is None
    for duration in (120, 180, 200, 300, 3600):
        ledger.policy.check("app", duration, "xlarge")


def test_a_quota_set_for_the_app_says_where_it_was_set(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("ZEROGPU_QUOTA", "app=100")
    ledger = SQLiteLedger(tmp_path / "quota.sqlite3", clock=clock)
    try:
        ledger.settle(ledger.admit(APP, 80, "large", this_process())[0], 80)
        with pytest.raises(QuotaExceeded) as caught:
            ledger.admit(APP, 30, "large", this_process())
        message = str(caught.value)
        for part in ("the app's own account 'my-app'", "20 s of its daily GPU quota left",
                     "ZEROGPU_QUOTA=app=100", "raise it in ZEROGPU_QUOTA"):
            assert part in message
        with pytest.raises(InvalidArgument, match=r"above the app's own account's maximum of 100 s .*ZEROGPU_QUOTA"):
            ledger.policy.check("app", 120, "large")
    finally:
        ledger.close()


@pytest.mark.parametrize("seconds, spelled", [(0, "0:00:00"), (40.2, "0:00:41"), (11525, "3:12:05"),
                                              (86400, "24:00:00")])
def test_when_a_quota_comes_back_is_said_as_zerogpu_says_it(seconds, spelled):
    assert clock_time(seconds) == spelled


def test_a_call_is_charged_to_the_day_it_was_admitted(ledger, clock):
    clock.now = next_reset(NOON) - 5
    lease_id, _ = ledger.admit(FREE, 60, "large", this_process())
    clock.now += 30
    ledger.settle(lease_id, 30)
    assert ledger.balance(FREE).used == 0  # the new day is untouched
    clock.now -= 30
    assert ledger.balance(FREE).used == 30


def test_identities_of_different_tiers_are_apart(ledger):
    lease_id, _ = ledger.admit(Identity("ada", "pro"), 100, "large", this_process())
    ledger.settle(lease_id, 100)
    assert ledger.balance(FREE).used == 0
    assert [(b.identity, b.used) for b in ledger.balances()] == [(Identity("ada", "pro"), 100)]


def test_usage_survives_a_restart(place, clock):
    path = place
    first = open_ledger(path, clock=clock)
    lease_id, _ = first.admit(FREE, 60, "large", this_process())
    first.settle(lease_id, 42)
    first.close()
    second = open_ledger(path, clock=clock)
    try:
        assert second.balance(FREE).used == 42
    finally:
        second.close()


def test_the_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "data" / "quota.sqlite3"
    opened = SQLiteLedger(path)
    opened.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_concurrent_threads_never_overspend(ledger):
    admitted = []
    refused = []

    def call():
        try:
            admitted.append(ledger.admit(FREE, 10, "large", this_process())[0])
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=call) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 21 and len(refused) == 19
    assert ledger.balance(FREE).reserved == 210


ADMIT_SCRIPT = textwrap.dedent("""
    import sys
    from zerogpu.errors import QuotaExceeded
    from zerogpu.identity import Identity
    from zerogpu.schedule.ledger import open_ledger
    from zerogpu.schedule.quota import this_process
    ledger = open_ledger(sys.argv[1], node=sys.argv[3])
    admitted = 0
    for _ in range(int(sys.argv[2])):
        try:
            lease_id, _ = ledger.admit(Identity("ada", "free"), 10, "large", this_process())
        except QuotaExceeded:
            continue
        ledger.settle(lease_id, 10)
        admitted += 1
    ledger.close()
    print(admitted)
""")


@pytest.mark.slow
def test_concurrent_processes_never_overspend(place):
    path = place
    open_ledger(path).close()
    # Four processes, as if on two nodes.
    procs = [
        subprocess.Popen([sys.executable, "-c", ADMIT_SCRIPT, str(path), "12", f"node-{n % 2}"],
                         stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    counts = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert sum(counts) == 21
    check = open_ledger(path)
    try:
        assert check.balance(FREE).used == 210
    finally:
        check.close()


HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from zerogpu.identity import Identity
    from zerogpu.schedule.ledger import open_ledger
    from zerogpu.schedule.quota import this_process
    ledger = open_ledger(sys.argv[1])
    ledger.admit(Identity("ada", "free"), 200, "large", this_process())
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
def test_reservations_of_a_dead_process_are_swept_uncharged(place):
    path = place
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        ledger = open_ledger(path)
        try:
            assert ledger.balance(FREE).reserved == 200
            with pytest.raises(QuotaExceeded):
                ledger.admit(FREE, 100, "large", this_process())
        finally:
            proc.kill()
            proc.wait()
        ledger.admit(FREE, 100, "large", this_process())  # sweeps the dead reservation
        assert ledger.balance(FREE).used == 0
        ledger.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_reused_pid_is_not_mistaken_for_its_predecessor():
    me = this_process()
    assert me.alive()
    assert not Owner(me.pid, me.started - 100).alive()
    assert not Owner(2**22 + 12345, 0.0).alive()


def test_reservations_list_where_calls_run(ledger):
    lease_id, _ = ledger.admit(PRO, 30, "large", this_process(), device=2, slot=1)
    waiting, _ = ledger.admit(FREE, 20, "xlarge", this_process())
    ledger.place(waiting, 3, None, new_id=77)
    rows = {row.id: row for row in ledger.reservations()}
    assert set(rows) == {lease_id, 77}
    assert (rows[lease_id].device, rows[lease_id].slot, rows[lease_id].cost) == (2, 1, 30)
    assert (rows[77].device, rows[77].slot, rows[77].cost, rows[77].size) == (3, None, 40, "xlarge")
    assert rows[77].owner == this_process() and rows[77].holder == "embedded"


def test_a_fixed_lease_id_cannot_be_admitted_twice(ledger):
    ledger.admit(FREE, 10, "large", this_process(), lease_id=5)
    with pytest.raises(SchedulerError, match="already admitted"):
        ledger.admit(FREE, 10, "large", this_process(), lease_id=5)


@pytest.mark.parametrize("seconds, spelled", [(0, "0 s"), (12.2, "13 s"), (250, "4 min 10 s"), (11520, "3 h 12 min")])
def test_durations_are_spelled_for_people(seconds, spelled):
    assert spell_seconds(seconds) == spelled


def test_an_unusable_ledger_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SchedulerError, match="cannot open the quota ledger .*ZEROGPU_DATA_DIR"):
        SQLiteLedger(blocker / "quota.sqlite3")


def test_one_failing_write_in_a_group_leaves_the_others_in_place(tmp_path):
    from zerogpu.schedule.quota import DuplicateLease, Reservation
    from zerogpu.schedule.quota_sqlite import Work

    ledger = SQLiteLedger(tmp_path / "quota.sqlite3")

    def admit(lease_id):
        row = Reservation(lease_id, FREE, "2026-11-23", "large", 10.0, 10.0, None, None, "embedded", this_process(),
                          0.0, ledger.node, 1e12, lease_id)
        return lambda db: (ledger._insert(db, row), lease_id)[1]

    ledger.admit(FREE, 10, "large", this_process(), lease_id=7)
    batch = [Work(admit(1)), Work(admit(7)), Work(admit(2))]  # 7 is taken: that one fails
    ledger._write(batch)
    assert [work.done for work in batch] == [True, True, True]
    assert batch[0].outcome() == 1 and batch[2].outcome() == 2
    with pytest.raises(DuplicateLease):
        batch[1].outcome()
    assert sorted(row.id for row in ledger.reservations()) == [1, 2, 7]
    ledger.close()


def test_threads_admitting_at_once_are_all_recorded(ledger):
    import threading

    admitted = []
    start = threading.Barrier(8)

    def admit():
        start.wait()
        for _ in range(50):
            admitted.append(ledger.admit(PRO, 1, "large", this_process())[0])

    threads = [threading.Thread(target=admit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(admitted)) == 400
    assert sorted(row.id for row in ledger.reservations()) == sorted(admitted)
    assert ledger.balance(PRO).reserved == pytest.approx(400)


# -- nodes, expiry and the engines' own failures ------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_reservations_of_a_node_that_stops_renewing_expire_uncharged(place, clock):
    dead = open_ledger(place, clock=clock, node="dead", lease_timeout=6)
    alive = open_ledger(place, clock=clock, node="alive", lease_timeout=6)
    try:
        dead.register([{"index": 0, "name": "GPU 0"}], 2)
        alive.register([{"index": 0, "name": "GPU 0"}], 2)
        dead.admit(FREE, 200, "large", this_process())
        assert [node.name for node in alive.nodes()] == ["alive", "dead"]
        with pytest.raises(QuotaExceeded):
            alive.admit(FREE, 100, "large", this_process())
        clock.now += 5
        alive.renew()  # the live node beats; the dead one does not
        lease_id, _ = alive.admit(PRO, 10, "large", this_process())
        clock.now += 2  # 7 s after the dead node's last renewal, 2 s after the live one's
        assert [node.name for node in alive.nodes()] == ["alive"]
        alive.admit(FREE, 100, "large", this_process())  # the dead node's 200 s came back
        assert alive.balance(FREE).used == 0
        assert {row.id for row in alive.reservations() if row.identity == PRO} == {lease_id}
    finally:
        dead.close()
        alive.close()


def test_a_closed_node_leaves_the_fleet(place, clock):
    node = open_ledger(place, clock=clock, node="gone")
    node.register([{"index": 0}], 2, socket_path="/run/zerogpu.sock")
    watcher = open_ledger(place, clock=clock)
    try:
        (seen,) = watcher.nodes()
        assert (seen.name, seen.slices, seen.socket, seen.devices) == ("gone", 2, "/run/zerogpu.sock", [{"index": 0}])
        node.close()
        assert watcher.nodes() == []
    finally:
        watcher.close()


def test_a_charge_written_twice_counts_once(ledger):
    lease_id, _ = ledger.admit(FREE, 60, "large", this_process())
    known = ledger._mine[lease_id]
    assert ledger._settle(lease_id, 20, known) == 20
    assert ledger._settle(lease_id, 20, known) == 0  # a retry after an outage: already written
    assert ledger.balance(FREE).used == 20


def test_a_warm_worker_s_reused_lease_id_is_charged_for_each_call(ledger):
    first, _ = ledger.admit(FREE, 10, "large", this_process(), lease_id=42)
    ledger.settle(first, 4)
    second, _ = ledger.admit(FREE, 10, "large", this_process(), lease_id=42)
    ledger.settle(second, 5)
    assert ledger.balance(FREE).used == 9


def test_the_schema_has_a_version_row(place):
    open_ledger(place).close()
    if place.startswith("postgresql"):
        import psycopg

        with psycopg.connect(place) as db:
            assert db.execute("SELECT value FROM zerogpu_meta WHERE key='schema'").fetchone() == ("1",)
    else:
        import sqlite3

        with sqlite3.connect(place) as db:
            assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)


def test_a_file_of_the_first_schema_is_migrated_keeping_its_usage(tmp_path, clock):
    import sqlite3

    from zerogpu.schedule.quota import day_of
    from zerogpu.schedule.quota_sqlite import SCHEMA_V1

    path = tmp_path / "quota.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V1)
        db.execute("INSERT INTO usage VALUES ('ada', 'free', ?, 33)", (day_of(NOON),))
    ledger = SQLiteLedger(path, clock=clock)
    try:
        assert ledger.balance(FREE).used == 33
        lease_id, _ = ledger.admit(FREE, 10, "large", this_process())
        assert ledger.settle(lease_id, 10) == 10
    finally:
        ledger.close()


def test_a_newer_schema_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "quota.sqlite3"
    SQLiteLedger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(SchedulerError, match="version 99, newer"):
        SQLiteLedger(path)


def test_a_server_that_is_down_is_a_clear_error_before_anything_is_admitted():
    with pytest.raises(SchedulerError, match="cannot reach the quota ledger .*check that the server runs"):
        open_ledger(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/zerogpu")


def test_the_password_stays_out_of_the_messages():
    with pytest.raises(SchedulerError) as caught:
        open_ledger(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/zerogpu")
    assert "hunter2" not in str(caught.value) and "postgres:***@" in str(caught.value)


def test_a_bad_url_is_a_clear_error(postgres_server):
    with pytest.raises(SchedulerError, match="cannot reach the quota ledger|not usable"):
        open_ledger(postgres_server.url("no_such_database"))


def test_an_outage_fails_admissions_and_keeps_the_charges_of_running_calls(postgres_server, postgres_url, clock):
    ledger = open_ledger(postgres_url, clock=clock)
    try:
        running, _ = ledger.admit(FREE, 60, "large", this_process())
        dropped, _ = ledger.admit(FREE, 60, "large", this_process())
        postgres_server.stop()
        try:
            with pytest.raises(SchedulerError, match="unreachable|cannot reach"):
                ledger.admit(FREE, 10, "large", this_process())
            assert ledger.settle(running, 25) == 25  # the call finished: its charge waits
            assert ledger.settle(dropped, None) == 0
            assert ledger.pending() == 2
            assert ledger.flush() == 2  # still down
        finally:
            postgres_server.start()
        assert ledger.flush() == 0
        balance = ledger.balance(FREE)
        assert (balance.used, balance.reserved) == (25, 0)
        assert ledger.flush() == 0 and ledger.balance(FREE).used == 25  # written once
        ledger.admit(FREE, 10, "large", this_process())
    finally:
        ledger.close()


def test_hundreds_of_concurrent_admissions_from_two_nodes_never_overspend(postgres_url):
    quota = Policy(daily_quota={"free": 300})
    nodes = [open_ledger(postgres_url, quota, node=f"node-{n}") for n in range(2)]
    admitted, refused = [], []
    start = threading.Barrier(16)

    def call(ledger):
        start.wait()
        for _ in range(25):
            try:
                admitted.append(ledger.admit(FREE, 1, "large", this_process())[0])
            except QuotaExceeded:
                refused.append(1)

    threads = [threading.Thread(target=call, args=(nodes[n % 2],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(admitted) == 300 and len(refused) == 100
        assert nodes[0].balance(FREE).reserved == 300
    finally:
        for ledger in nodes:
            ledger.close()
