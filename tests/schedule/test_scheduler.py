"""The embedded scheduler: placement, queue order, aging, backfill, warm leases, quotas, faults."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from zerogpu.schedule import choice
from zerogpu.cuda.devices import emulated_devices
from zerogpu.errors import Cancelled, InvalidArgument, NoGPUAvailable, QuotaExceeded, SchedulerError
from zerogpu.identity import APP_TIER, TIERS, Identity, app_identity, current, identity
from zerogpu.schedule.policy import TIER_RANK, Policy
from zerogpu.schedule.quota import this_process
from zerogpu.schedule.quota_sqlite import SQLiteLedger
from zerogpu.schedule.leases import Lease, LeaseRequest
from zerogpu.schedule.scheduler import EmbeddedScheduler

ROOMY = {tier: 1e6 for tier in TIERS}
PRO = Identity("grace", "pro")
FREE = Identity("ada", "free")
ANONYMOUS = Identity("anonymous:192.0.2.1", "anonymous")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make(tmp_path):
    made = []

    def make(gpus: int = 1, *, clock=time.monotonic, quota=ROOMY, **policy) -> EmbeddedScheduler:
        rules = Policy(daily_quota=quota, max_duration={tier: 3600 for tier in TIERS}, **policy)
        ledger = SQLiteLedger(tmp_path / f"quota-{len(made)}.sqlite3", rules)
        made.append(EmbeddedScheduler(emulated_devices(gpus), ledger=ledger, clock=clock))
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.close()


def large(who: Identity = PRO, duration: float = 10, key: str | None = None) -> LeaseRequest:
    return LeaseRequest(who, duration, "large", key)


def xlarge(who: Identity = PRO, duration: float = 10, key: str | None = None) -> LeaseRequest:
    return LeaseRequest(who, duration, "xlarge", key)


class Served:
    """Collects the outcome of calls queued with submit(), in the order they came."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.by_name: dict[str, object] = {}

    def queue(self, scheduler: EmbeddedScheduler, name: str, request: LeaseRequest, *,
              timeout: float = 1e6, owner=None):
        def done(waiter):
            self.order.append(name)
            self.by_name[name] = waiter

        waiter = scheduler.submit(request, timeout=timeout, on_done=done, owner=owner)
        if waiter.lease is not None:
            done(waiter)
        return waiter


def cells(scheduler: EmbeddedScheduler) -> list[list[int | None]]:
    return [device["slots"] for device in scheduler.status()["devices"]]


# -- identity ------------------------------------------------------------------------------


def test_calls_with_no_identity_run_on_the_apps_own_account(monkeypatch):
    monkeypatch.delenv("ZEROGPU_APP", raising=False)
    main = sys.modules["__main__"]
    assert current() == app_identity() == Identity(os.path.abspath(main.__file__), "app")
    monkeypatch.setenv("ZEROGPU_APP", "my-app")
    assert current() == Identity("my-app", "app")


def test_identity_holds_inside_its_block_only():
    with identity("ada") as outer:
        assert current() == outer == Identity("ada", "free")
        with identity("grace", tier="pro"):
            assert current() == PRO
        assert current() == outer
    assert current() == app_identity()


def test_identity_follows_asyncio_tasks():
    async def seen_by_a_task():
        return current()

    async def main():
        with identity("ada", "pro"):
            task = asyncio.create_task(seen_by_a_task())
        outside = current()
        return await task, outside

    inside, outside = asyncio.run(main())
    assert inside == Identity("ada", "pro") and outside == app_identity()


@pytest.mark.parametrize("user, tier, message", [
    ("ada", "gold", "tier 'gold' is unknown"),
    ("", "free", "non-empty string"),
    (None, "free", "non-empty string"),
    ("x" * 300, "free", "at most 256"),
])
def test_a_bad_identity_is_refused(user, tier, message):
    with pytest.raises(InvalidArgument, match=message):
        with identity(user, tier):
            pass


# -- placement -----------------------------------------------------------------------------


def test_large_calls_fill_a_gpu_before_taking_another(make):
    scheduler = make(2)
    leases = [scheduler.acquire(large(), timeout=0) for _ in range(3)]
    assert [(lease.device.index, lease.slot) for lease in leases] == [(0, 0), (0, 1), (1, 0)]
    assert {lease.memory_fraction for lease in leases} == {0.5}
    assert len({lease.id for lease in leases}) == 3


def test_an_xlarge_call_takes_a_whole_gpu(make):
    scheduler = make(2)
    whole = scheduler.acquire(xlarge(), timeout=0)
    assert (whole.device.index, whole.slot, whole.memory_fraction) == (0, None, 1.0)
    assert cells(scheduler)[0] == [whole.id, whole.id]
    halves = [scheduler.acquire(large(), timeout=0) for _ in range(2)]
    assert {lease.device.index for lease in halves} == {1}
    with pytest.raises(NoGPUAvailable, match="0 s .4 of 4 GPU slices busy"):
        scheduler.acquire(xlarge(), timeout=0)
    scheduler.release(whole, used=1)
    assert scheduler.acquire(xlarge(), timeout=0).device.index == 0


def test_the_number_of_large_calls_per_gpu_is_set_per_node(make):
    scheduler = make(1, large_per_gpu=4)
    leases = [scheduler.acquire(large(), timeout=0) for _ in range(4)]
    assert sorted(lease.slot for lease in leases) == [0, 1, 2, 3]
    assert {lease.memory_fraction for lease in leases} == {0.25}
    with pytest.raises(NoGPUAvailable):
        scheduler.acquire(large(), timeout=0)


def test_a_released_slice_is_handed_out_again(make):
    scheduler = make(1)
    first = scheduler.acquire(large(), timeout=0)
    scheduler.acquire(large(), timeout=0)
    scheduler.release(first, used=1)
    again = scheduler.acquire(large(), timeout=0)
    assert (again.device.index, again.slot) == (0, first.slot) and again.id != first.id


# -- queue order ---------------------------------------------------------------------------


def test_waiting_calls_go_by_tier_then_quota_left_then_duration_then_arrival(make):
    scheduler = make(1, large_per_gpu=1, quota={"anonymous": 1000, "free": 1000, "pro": 1000})
    lease_id, _ = scheduler.ledger.admit(Identity("ada", "free"), 500, "large", this_process())
    scheduler.ledger.settle(lease_id, 500)  # ada has 500 s left, the other free users 1000 s
    running = scheduler.acquire(large(), timeout=0)
    served = Served()
    served.queue(scheduler, "anonymous", large(ANONYMOUS, 10))
    served.queue(scheduler, "ada", large(Identity("ada", "free"), 10))
    served.queue(scheduler, "bob-20s", large(Identity("bob", "free"), 20))
    served.queue(scheduler, "carl", large(Identity("carl", "free"), 10))
    served.queue(scheduler, "pro", large(Identity("grace", "pro"), 50))
    served.queue(scheduler, "dan", large(Identity("dan", "free"), 10))
    assert [entry["user"] for entry in scheduler.status()["queue"]] == [
        "grace", "carl", "dan", "bob", "ada", ANONYMOUS.user,
    ]
    for _ in range(6):
        scheduler.release(running, used=1)
        running = served.by_name[served.order[-1]].lease
    assert served.order == ["pro", "carl", "dan", "bob-20s", "ada", "anonymous"]


def test_the_apps_own_calls_queue_with_a_fresh_free_visitors(make):
    scheduler = make(1, large_per_gpu=1, quota={"anonymous": 1000, "free": 1000, "pro": 1000})
    running = scheduler.acquire(large(), timeout=0)
    served = Served()
    served.queue(scheduler, "anonymous", large(ANONYMOUS, 10))
    served.queue(scheduler, "free", large(Identity("ada", "free"), 10))
    served.queue(scheduler, "app", large(Identity("my-app", "app"), 10))
    served.queue(scheduler, "pro", large(Identity("grace", "pro"), 10))
    assert [entry["tier"] for entry in scheduler.status()["queue"]] == ["pro", "free", "app", "anonymous"]
    for _ in range(4):
        scheduler.release(running, used=1)
        running = served.by_name[served.order[-1]].lease
    assert served.order == ["pro", "free", "app", "anonymous"]
    scheduler.release(running, used=1)


@pytest.mark.parametrize("released_at, first", [(26.0, "pro"), (30.5, "anonymous")])
def test_waiting_lifts_a_call_one_tier_per_aging_period(make, released_at, first):
    clock = Clock()
    start = clock.now
    scheduler = make(1, large_per_gpu=1, clock=clock, aging=10)
    running = scheduler.acquire(large(Identity("someone", "pro")), timeout=0)
    served = Served()
    served.queue(scheduler, "anonymous", large(ANONYMOUS, 10))
    clock.now = start + 25  # two tiers apart: the anonymous call needs 2 x 10 s more of waiting
    served.queue(scheduler, "pro", large(PRO, 5))
    clock.now = start + released_at
    scheduler.release(running, used=1)
    assert served.order == [first]


def test_an_xlarge_call_reserves_the_gpu_that_drains_first_and_short_calls_backfill(make):
    clock = Clock()
    scheduler = make(2, clock=clock)
    long_ = scheduler.acquire(large(duration=100), timeout=0)
    scheduler.acquire(large(duration=50), timeout=0)
    short = scheduler.acquire(large(duration=10), timeout=0)
    assert short.device.index == 1
    served = Served()
    served.queue(scheduler, "whole", xlarge(PRO, 30))
    clock.now += 1
    backfilled = served.queue(scheduler, "fits-before-drain", large(FREE, 5))
    assert backfilled.lease is not None and (backfilled.lease.device.index, backfilled.lease.slot) == (1, 1)
    served.queue(scheduler, "too-long", large(FREE, 20))
    assert served.order == ["fits-before-drain"]
    clock.now += 5
    scheduler.release(backfilled.lease, used=5)
    assert served.order == ["fits-before-drain"]  # the free slice stays for the xlarge call
    clock.now += 4
    scheduler.release(short, used=10)
    assert served.order == ["fits-before-drain", "whole"]
    assert served.by_name["whole"].lease.device.index == 1
    scheduler.release(long_, used=10)
    assert served.order[-1] == "too-long"


def test_a_long_large_call_behind_an_xlarge_one_uses_a_gpu_not_reserved(make):
    scheduler = make(2)
    scheduler.acquire(large(duration=10), timeout=0)
    scheduler.acquire(large(duration=10), timeout=0)
    scheduler.acquire(large(duration=100), timeout=0)
    served = Served()
    served.queue(scheduler, "whole", xlarge(PRO, 10))   # GPU 0 drains first: reserved
    served.queue(scheduler, "half", large(FREE, 500))
    assert served.order == ["half"] and served.by_name["half"].lease.device.index == 1


# -- warm leases ---------------------------------------------------------------------------


def test_a_parked_lease_comes_back_warm_to_the_same_function(make):
    scheduler = make(1)
    parked_calls = []
    lease = scheduler.acquire(large(key="f"), timeout=0)
    scheduler.release(lease, used=2, park=lambda: parked_calls.append(1))
    other = scheduler.acquire(large(key="g"), timeout=0)
    assert not other.warm and other.id != lease.id
    again = scheduler.acquire(large(FREE, 5, key="f"), timeout=0)
    assert again.warm and again.id == lease.id and (again.device, again.slot) == (lease.device, lease.slot)
    assert again.request.identity == FREE and parked_calls == []
    assert scheduler.ledger.balance(PRO).used == 2


def test_a_parked_lease_is_not_handed_to_another_size_or_owner(make):
    scheduler = make(2)
    served = Served()
    served.queue(scheduler, "a", large(key="f"), owner="app-a")
    scheduler.release(served.by_name["a"].lease, used=1, park=lambda: None)
    assert not served.queue(scheduler, "b", large(key="f"), owner="app-b").lease.warm
    assert not scheduler.acquire(xlarge(key="f"), timeout=0).warm
    assert served.queue(scheduler, "c", large(key="f"), owner="app-a").lease.warm


def test_a_parked_lease_is_evicted_when_a_waiting_call_needs_it(make):
    scheduler = make(1)
    evictions = []

    def park():
        evictions.append(scheduler._lock.locked())

    first = scheduler.acquire(large(key="f"), timeout=0)
    second = scheduler.acquire(large(key="g"), timeout=0)
    scheduler.release(first, used=1, park=park)
    lease = scheduler.acquire(large(key="h"), timeout=5)
    assert evictions == [False]  # called once, without the scheduler's lock
    assert (lease.device.index, lease.slot) == (first.device.index, first.slot) and not lease.warm
    scheduler.release(second, used=1, park=park)
    assert len(evictions) == 1  # nobody needs the second one


def test_an_xlarge_call_evicts_every_parked_lease_on_its_gpu(make):
    scheduler = make(1)
    evicted = []
    leases = [scheduler.acquire(large(key=k), timeout=0) for k in "fg"]
    for lease, name in zip(leases, "fg", strict=True):
        scheduler.release(lease, used=1, park=lambda name=name: evicted.append(name))
    whole = scheduler.acquire(xlarge(key="h"), timeout=5)
    assert sorted(evicted) == ["f", "g"] and whole.slot is None


def test_releasing_with_park_while_calls_wait_evicts_at_once(make):
    scheduler = make(1, large_per_gpu=1)
    evicted = threading.Event()
    lease = scheduler.acquire(large(key="f"), timeout=0)
    served = Served()
    served.queue(scheduler, "waiting", large(FREE, 5, key="g"))
    scheduler.release(lease, used=1, park=evicted.set)
    assert evicted.wait(5)
    deadline = time.monotonic() + 120  # a hang guard, not a timing
    while not served.order and time.monotonic() < deadline:
        time.sleep(0.005)
    assert served.order == ["waiting"]


def test_a_waiting_call_of_the_same_function_takes_the_parked_lease(make):
    scheduler = make(1, large_per_gpu=1)
    evicted = []
    lease = scheduler.acquire(large(key="f"), timeout=0)
    served = Served()
    served.queue(scheduler, "same", large(FREE, 5, key="f"))
    scheduler.release(lease, used=1, park=lambda: evicted.append(1))
    assert served.order == ["same"] and served.by_name["same"].lease.warm
    assert served.by_name["same"].lease.id == lease.id and evicted == []
    rows = scheduler.ledger.reservations()
    assert [row.id for row in rows] == [lease.id]  # its quota row follows the lease id


def test_drop_returns_a_parked_lease_and_ignores_anything_else(make):
    scheduler = make(1, large_per_gpu=1)
    lease = scheduler.acquire(large(key="f"), timeout=0)
    scheduler.release(lease, used=1, park=lambda: pytest.fail("evicted a dropped lease"))
    scheduler.drop(lease)
    scheduler.drop(lease)
    running = scheduler.acquire(large(key="g"), timeout=0)
    scheduler.drop(running)  # not parked: still running
    with pytest.raises(NoGPUAvailable):
        scheduler.acquire(large(), timeout=0)
    scheduler.release(running, used=1)


def test_a_stale_drop_does_not_free_a_lease_handed_out_warm_again(make):
    scheduler = make(1, large_per_gpu=1)
    parked = scheduler.acquire(large(key="f"), timeout=0)
    scheduler.release(parked, used=1, park=lambda: None)
    again = scheduler.acquire(large(key="f"), timeout=0)
    scheduler.drop(parked)  # the idle timer of the old worker fired late
    assert cells(scheduler) == [[again.id]]
    scheduler.release(again, used=1)


# -- quotas --------------------------------------------------------------------------------


def test_a_call_over_quota_is_refused_before_it_queues(make):
    scheduler = make(1, large_per_gpu=1, quota={"free": 100})
    running = scheduler.acquire(large(FREE, 80), timeout=0)
    with pytest.raises(QuotaExceeded, match="asked for 50 s but has 20 s"):
        scheduler.acquire(large(FREE, 50), timeout=5)
    assert scheduler.status()["queue"] == []
    scheduler.release(running, used=1)
    assert scheduler.acquire(large(FREE, 99), timeout=0)


def test_release_charges_the_time_used_and_nothing_on_failure(make):
    scheduler = make(1)
    lease = scheduler.acquire(large(FREE, 60), timeout=0)
    assert scheduler.ledger.balance(FREE).reserved == 60
    scheduler.release(lease, used=7.5)
    failed = scheduler.acquire(xlarge(FREE, 60), timeout=0)
    assert scheduler.ledger.balance(FREE).reserved == 120
    scheduler.release(failed, used=3, charge=False)
    whole = scheduler.acquire(xlarge(FREE, 60), timeout=0)
    scheduler.release(whole, used=4)
    balance = scheduler.ledger.balance(FREE)
    assert (balance.used, balance.reserved) == (7.5 + 8, 0)


def test_time_spent_waiting_is_not_charged(make):
    scheduler = make(1, large_per_gpu=1)
    running = scheduler.acquire(large(), timeout=0)
    threading.Timer(0.3, scheduler.release, args=(running,), kwargs={"used": 0.3}).start()
    waited_for = scheduler.acquire(large(FREE, 60), timeout=5)
    scheduler.release(waited_for, used=0.05)
    assert scheduler.ledger.balance(FREE).used == pytest.approx(0.05)


def test_the_quota_a_waiting_call_reserved_comes_back_when_it_gives_up(make):
    scheduler = make(1, large_per_gpu=1, quota={"free": 100})
    running = scheduler.acquire(large(), timeout=0)
    with pytest.raises(NoGPUAvailable):
        scheduler.acquire(large(FREE, 80), timeout=0.05)
    assert scheduler.ledger.balance(FREE).reserved == 0
    scheduler.release(running, used=1)


@pytest.mark.parametrize("request_, message", [
    (LeaseRequest(FREE, 10, "medium"), "size 'medium' is unknown"),
    (LeaseRequest(FREE, -1), "positive number of seconds"),
    (LeaseRequest(FREE, float("nan")), "positive number of seconds"),
    (LeaseRequest(FREE, "10"), "positive number of seconds"),
    (LeaseRequest(FREE, True), "positive number of seconds"),
    (LeaseRequest(FREE, 300), "above the free tier's maximum of 210 s"),
    (LeaseRequest(FREE, 150, "xlarge"), "costs 300 s of quota.*at most 105 s"),
])
def test_illegal_requests_are_refused_with_what_to_ask_instead(tmp_path, request_, message):
    ledger = SQLiteLedger(tmp_path / "quota.sqlite3")
    scheduler = EmbeddedScheduler(emulated_devices(1), ledger=ledger)
    try:
        with pytest.raises(InvalidArgument, match=message):
            scheduler.acquire(request_, timeout=0)
        assert ledger.reservations() == [] and cells(scheduler) == [[None, None]]
    finally:
        scheduler.close()


def test_a_bad_timeout_or_used_value_is_refused(make):
    scheduler = make(1)
    with pytest.raises(InvalidArgument, match="queue timeout"):
        scheduler.acquire(large(), timeout=-1)
    lease = scheduler.acquire(large(), timeout=0)
    with pytest.raises(InvalidArgument, match="used must be"):
        scheduler.release(lease, used=-3)
    scheduler.release(lease, used=3)


# -- waiting, giving up, failing -----------------------------------------------------------


def test_no_gpu_within_the_queue_timeout_raises_no_gpu_available(make):
    scheduler = make(1, large_per_gpu=1)
    scheduler.acquire(large(), timeout=0)
    started = time.monotonic()
    with pytest.raises(NoGPUAvailable, match="within 0.2 s"):
        scheduler.acquire(large(FREE), timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.5
    assert scheduler.status()["queue"] == []


def test_the_default_queue_timeout_comes_from_settings(make, monkeypatch):
    monkeypatch.setenv("ZEROGPU_QUEUE_TIMEOUT", "0.1")
    scheduler = make(1, large_per_gpu=1)
    scheduler.acquire(large(), timeout=0)
    with pytest.raises(NoGPUAvailable, match="within 0.1 s"):
        scheduler.acquire(large(FREE))


def test_a_cancelled_call_leaves_the_queue_at_once(make):
    scheduler = make(1, large_per_gpu=1)
    scheduler.acquire(large(), timeout=0)
    cancel = threading.Event()
    outcome = []

    def wait():
        try:
            scheduler.acquire(large(FREE, 30), timeout=30, cancel=cancel)
        except Cancelled as error:
            outcome.append((error, time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    while not scheduler.status()["queue"]:
        time.sleep(0.005)
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(5)
    assert outcome and outcome[0][1] - cancelled_at < 0.2
    assert scheduler.status()["queue"] == [] and scheduler.ledger.balance(FREE).reserved == 0


class Interrupting:
    """A cancel event whose first look raises KeyboardInterrupt, as Ctrl-C in a waiting caller does."""

    def __init__(self, before=None):
        self.before = before

    def is_set(self):
        if self.before is not None:
            self.before()
        raise KeyboardInterrupt


def test_an_interrupted_wait_leaves_the_queue_and_holds_nothing(make):
    scheduler = make(1, large_per_gpu=1)
    running = scheduler.acquire(large(), timeout=0)
    with pytest.raises(KeyboardInterrupt):
        scheduler.acquire(large(FREE, 30), timeout=30, cancel=Interrupting())
    assert scheduler.status()["queue"] == [] and scheduler.ledger.balance(FREE).reserved == 0
    scheduler.release(running, used=0.1)
    assert scheduler.status()["leases"] == [] and scheduler.ledger.reservations() == []


def test_a_lease_granted_as_the_wait_is_interrupted_is_given_back(make):
    scheduler = make(1, large_per_gpu=1)
    running = scheduler.acquire(large(), timeout=0)
    # The GPU frees up, and the waiting call is served, just before Ctrl-C lands.
    interrupting = Interrupting(before=lambda: scheduler.release(running, used=0.1))
    with pytest.raises(KeyboardInterrupt):
        scheduler.acquire(large(FREE, 30), timeout=30, cancel=interrupting)
    assert scheduler.status()["leases"] == [] and scheduler.ledger.reservations() == []
    assert scheduler.ledger.balance(FREE).used == 0


def test_a_release_whose_charge_fails_frees_the_lease_instead_of_parking_it(make, monkeypatch):
    scheduler = make(1)
    lease = scheduler.acquire(large(FREE, 60), timeout=0)

    def failing(*args, **kwargs):
        raise SchedulerError("the quota ledger failed: disk I/O error")

    monkeypatch.setattr(scheduler.ledger, "settle", failing)
    with pytest.raises(SchedulerError):
        scheduler.release(lease, used=1.0, park=lambda: None)
    assert scheduler.status()["leases"] == []  # not parked with a worker about to be killed


def test_expire_ends_submitted_calls_past_their_timeout(make):
    clock = Clock()
    scheduler = make(1, large_per_gpu=1, clock=clock)
    scheduler.acquire(large(), timeout=0)
    served = Served()
    served.queue(scheduler, "short", large(FREE), timeout=5)
    served.queue(scheduler, "long", large(FREE), timeout=50)
    clock.now += 6
    assert scheduler.expire() == 1
    assert served.order == ["short"] and isinstance(served.by_name["short"].error, NoGPUAvailable)


def test_releasing_twice_or_a_foreign_lease_is_an_error(make):
    scheduler, other = make(1), make(1)
    lease = scheduler.acquire(large(), timeout=0)
    scheduler.release(lease, used=1)
    with pytest.raises(SchedulerError, match="released twice"):
        scheduler.release(lease, used=1)
    with pytest.raises(SchedulerError):
        other.release(scheduler.acquire(large(), timeout=0), used=1)
    assert scheduler.ledger.balance(PRO).used == 1


def test_abandon_returns_everything_an_owner_held_uncharged(make):
    scheduler = make(1, large_per_gpu=1)
    served = Served()
    served.queue(scheduler, "holds", large(FREE), owner="gone")
    served.queue(scheduler, "waits", large(FREE), owner="gone")
    served.queue(scheduler, "other", large(PRO), owner="alive")
    assert scheduler.abandon("gone") == 1
    assert served.order == ["holds", "waits", "other"]
    assert isinstance(served.by_name["waits"].error, SchedulerError)
    assert scheduler.ledger.balance(FREE).used == 0 and scheduler.ledger.balance(FREE).reserved == 0


def test_close_ends_waiting_calls(make):
    scheduler = make(1, large_per_gpu=1)
    scheduler.acquire(large(), timeout=0)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(SchedulerError, scheduler.acquire,
                                                                         large(FREE), timeout=30)))
    thread.start()
    while not scheduler.status()["queue"]:
        time.sleep(0.005)
    scheduler.close()
    thread.join(5)
    assert errors and not thread.is_alive()
    with pytest.raises(SchedulerError, match="closed"):
        scheduler.acquire(large(), timeout=0)


def test_no_gpu_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(SchedulerError, match="no GPU to schedule"):
        EmbeddedScheduler([], ledger=SQLiteLedger(tmp_path / "q.sqlite3"))


def test_adopted_leases_hold_their_cells_and_are_charged_on_release(make, tmp_path):
    scheduler = make(2)
    ledger = scheduler.ledger
    kept, _ = ledger.admit(FREE, 30, "xlarge", this_process(), device=1)
    lost, _ = ledger.admit(FREE, 30, "large", this_process(), device=7, slot=0)
    assert scheduler.adopt(ledger.reservations(), owner=lambda process: ("orphan", process)) == 1
    assert cells(scheduler)[1] == [kept, kept]
    assert [row.id for row in ledger.reservations()] == [kept]
    assert scheduler.transfer(("orphan", this_process()), "client") == 1
    lease = scheduler.status()["leases"][0]
    assert (lease["id"], lease["size"], lease["device"]) == (kept, "xlarge", 1)
    scheduler.release(Lease(kept, scheduler.devices[1], None, 1.0, xlarge(FREE, 30)), used=5)
    assert ledger.balance(FREE).used == 10 and lost != kept


# -- the process's scheduler --------------------------------------------------------------


def test_the_process_scheduler_is_embedded_without_a_daemon(tmp_path, monkeypatch):
    monkeypatch.delenv("ZEROGPU_SCHEDULER", raising=False)
    monkeypatch.setenv("ZEROGPU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "3")
    choice.reset_scheduler()
    try:
        first = choice.scheduler()
        assert isinstance(first, EmbeddedScheduler) and first is choice.scheduler()
        assert len(first.devices) == 3 and first.ledger.path == tmp_path / "quota.sqlite3"
        choice.reset_scheduler()
        assert choice.scheduler() is not first
    finally:
        choice.reset_scheduler()


def test_use_scheduler_installs_a_configured_one(make):
    chosen = make(1, large_per_gpu=3)
    try:
        choice.use_scheduler(chosen)
        assert choice.scheduler() is chosen
        assert choice.scheduler().acquire(large(), timeout=0).memory_fraction == pytest.approx(1 / 3)
    finally:
        choice.reset_scheduler()


# -- stress --------------------------------------------------------------------------------


def test_hundreds_of_concurrent_callers_over_four_gpus(make):
    """No lease is lost or given twice; every call completes or gets its documented error."""
    scheduler = make(4, quota={"anonymous": 60, "free": 1e6, "pro": 1e6})
    broke = Identity("broke", "free")  # has one second of quota left: all its calls are refused
    lease_id, _ = scheduler.ledger.admit(broke, 1e6 - 1, "large", this_process())
    scheduler.ledger.settle(lease_id, 1e6 - 1)
    guard = threading.Lock()
    taken: dict[tuple[int, int], int] = {}
    problems: list[str] = []
    outcomes: dict[str, int] = {"done": 0, "NoGPUAvailable": 0, "Cancelled": 0, "QuotaExceeded": 0}
    charged = {"sum": 0.0}
    rng = random.Random(7)
    plans = []
    for i in range(400):
        tier = rng.choice(TIERS)
        who = ANONYMOUS if tier == "anonymous" else Identity(f"user{i % 23}", tier)
        who = broke if i % 20 == 0 else who
        plans.append((who, rng.choice(["large"] * 3 + ["xlarge"]), rng.uniform(0.001, 0.01),
                      rng.choice([0.02, 5.0, 5.0, 5.0]), rng.random() < 0.1, f"k{i % 5}", rng.random() < 0.2))

    def call(who, size, hold, timeout, cancel_it, key, park):
        cancel = threading.Event()
        if cancel_it:
            threading.Timer(0.01, cancel.set).start()
        try:
            lease = scheduler.acquire(LeaseRequest(who, 2.0, size, key), timeout=timeout, cancel=cancel)
        except (NoGPUAvailable, Cancelled, QuotaExceeded) as error:
            with guard:
                outcomes[type(error).__name__] += 1
            return
        mine = [(lease.device.index, s) for s in ([lease.slot] if size == "large" else [0, 1])]
        with guard:
            for cell in mine:
                if cell in taken:
                    problems.append(f"{cell} given to {lease.id} while {taken[cell]} holds it")
                taken[cell] = lease.id
        time.sleep(hold)
        with guard:
            for cell in mine:
                if taken.pop(cell, None) != lease.id:
                    problems.append(f"{cell} lost by {lease.id}")
            outcomes["done"] += 1
            if who.tier != "anonymous":
                charged["sum"] += hold * (2 if size == "xlarge" else 1)
        # Parked leases are held by no call: their worker is "killed" by dropping nothing.
        scheduler.release(lease, used=hold, park=(lambda: None) if park else None)

    threads = [threading.Thread(target=call, args=plan) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert problems == []
    assert sum(outcomes.values()) == len(plans)
    assert outcomes["done"] > 200 and outcomes["QuotaExceeded"] >= 20
    status = scheduler.status()
    assert status["queue"] == [] and {lease["state"] for lease in status["leases"]} <= {"parked"}
    for lease in status["leases"]:
        scheduler.drop(Lease(lease["id"], None, None, 0, None))
    assert cells(scheduler) == [[None, None]] * 4
    assert scheduler.ledger.reservations() == []
    used = sum(b.used for b in scheduler.ledger.balances() if b.identity not in (ANONYMOUS, broke))
    assert used == pytest.approx(charged["sum"])


# -- properties ----------------------------------------------------------------------------

# Visitors' tiers: the app's own account ranks as a fresh free visitor (its own test says so).
TIER = st.sampled_from([tier for tier in TIERS if tier != APP_TIER])


@given(st.lists(st.tuples(TIER, st.floats(0, 1000), st.floats(0.5, 100), st.floats(0, 1000)), min_size=2, max_size=30),
       st.floats(1, 100))
def test_without_waiting_long_the_order_is_tier_quota_duration_arrival(calls, aging):
    policy = Policy(aging=aging)
    now = max(arrival for *_, arrival in calls)
    fresh = [c for c in calls if now - c[3] < aging]
    keys = sorted(fresh, key=lambda c: policy.priority(c[0], c[1], c[2], c[3], now))
    expected = sorted(fresh, key=lambda c: (-TIER_RANK[c[0]], -c[1], c[2], c[3]))
    assert [policy.priority(*c[:4], now) for c in keys] == [policy.priority(*c[:4], now) for c in expected]


@given(st.lists(st.tuples(TIER, st.floats(0, 500), st.floats(0.5, 100)), min_size=1, max_size=60),
       st.floats(0.5, 5), st.floats(1, 30), st.integers(0, 2**32))
@hsettings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_nothing_starves_only_recent_calls_overtake(arrivals, serve_every, aging, seed):
    """Serving one call every `serve_every` s, a call is only ever overtaken by calls that
    arrived less than (tier gap + 1) * aging after it, however the arrivals come."""
    policy = Policy(aging=aging)
    rng = random.Random(seed)
    pending = sorted((rng.uniform(0, 200), i, tier, left, duration)
                     for i, (tier, left, duration) in enumerate(arrivals))
    waiting: list[tuple] = []
    now = 0.0
    while pending or waiting:
        while pending and pending[0][0] <= now:
            waiting.append(pending.pop(0))
        if waiting:
            waiting.sort(key=lambda c: (*policy.priority(c[2], c[3], c[4], c[0], now), c[1]))
            served = waiting.pop(0)
            for other in waiting:
                if other[0] < served[0]:  # `served` overtook an older call
                    gap = TIER_RANK[served[2]] - TIER_RANK[other[2]]
                    assert served[0] < other[0] + (gap + 1) * aging
        now += serve_every


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), TIER, st.sampled_from(["large", "large", "xlarge"]), st.integers(1, 60)),
        st.tuples(st.just("end"), st.integers(0, 1000)),
        st.tuples(st.just("tick"), st.floats(0, 40)),
    ),
    max_size=60,
)


@given(OPS, st.integers(1, 3), st.integers(1, 3))
@hsettings(deadline=None, max_examples=60,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_scheduler_invariants_under_random_operations(tmp_path_factory, ops, gpus, per_gpu):
    """After any sequence of arrivals, ends and time passing: no cell is given twice, the
    first waiting call has no free room, and once calls stop arriving every call is served."""
    clock = Clock()
    rules = Policy(daily_quota=ROOMY, max_duration={t: 3600 for t in TIERS}, aging=20, large_per_gpu=per_gpu)
    ledger = SQLiteLedger(tmp_path_factory.mktemp("q") / "quota.sqlite3", rules)
    scheduler = EmbeddedScheduler(emulated_devices(gpus), ledger=ledger, clock=clock)
    running: list = []
    waiting: dict[int, object] = {}

    def done(waiter):
        waiting.pop(waiter.seq, None)
        assert waiter.error is None
        running.append(waiter.lease)

    def check():
        grid = cells(scheduler)
        held = {lease.id for lease in running}
        assert {c for row in grid for c in row if c is not None} == held
        for lease in running:
            slots = [lease.slot] if lease.request.size == "large" else range(per_gpu)
            mine = [grid[lease.device.index][s] for s in slots]
            assert mine == [lease.id] * len(mine)
        queue = scheduler.status()["queue"]
        if queue:
            top = queue[0]
            free_slots = [sum(c is None for c in row) for row in grid]
            if top["size"] == "xlarge":
                assert per_gpu not in free_slots
            else:
                assert not any(free_slots)

    try:
        for op in ops:
            if op[0] == "arrive":
                _, tier, size, duration = op
                who = ANONYMOUS if tier == "anonymous" else Identity(f"u-{tier}", tier)
                waiter = scheduler.submit(LeaseRequest(who, duration, size), timeout=1e9, on_done=done)
                if waiter.lease is not None:
                    running.append(waiter.lease)
                else:
                    waiting[waiter.seq] = waiter
            elif op[0] == "end" and running:
                scheduler.release(running.pop(op[1] % len(running)), used=1)
            elif op[0] == "tick":
                clock.now += op[1]
                continue  # priorities move with time; the next arrival or end serves them
            check()
        while running:
            clock.now += 1
            scheduler.release(running.pop(0), used=1)
            check()
        assert not waiting
    finally:
        scheduler.close()


@given(st.integers(0, 2**32), st.integers(1, 4))
@hsettings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_an_xlarge_call_is_not_starved_by_a_stream_of_large_ones(make, seed, gpus):
    """Pro large calls arrive each time a slice frees. They go first, as the policy says,
    until waiting lifts the free xlarge call above them ((tier gap + 1) x aging = 20 s);
    then the GPU that drains first is kept for it: it runs within 20 s + the longest duration."""
    clock = Clock()
    scheduler = make(gpus, clock=clock, aging=10)
    rng = random.Random(seed)
    ends: dict[int, tuple[float, object]] = {}
    whole = []

    def done(waiter):
        if waiter.lease is None:  # the scheduler was closed at the end of the test
            return
        if waiter.request.size == "xlarge":
            whole.append(waiter.lease)
        else:
            ends[waiter.lease.id] = (clock.now + waiter.request.duration, waiter.lease)

    def arrive(request):
        waiter = scheduler.submit(request, timeout=1e9, on_done=done)
        if waiter.lease is not None:
            done(waiter)

    for _ in range(2 * gpus):
        arrive(large(PRO, rng.uniform(5, 30)))
    arrive(xlarge(FREE, 20))
    start = clock.now
    while not whole:
        lease_id = min(ends, key=lambda i: ends[i][0])
        end, lease = ends.pop(lease_id)
        clock.now = end
        assert clock.now - start <= 20 + 30, "the xlarge call starved"
        scheduler.release(lease, used=1)
        arrive(large(PRO, rng.uniform(5, 30)))
