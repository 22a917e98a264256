"""Who gets which GPU, when, and on whose quota.

A call asks for a lease: its identity, the seconds it may run and its size
(`large`: one slice of a GPU, `xlarge`: the whole GPU). The scheduler first
admits it against the identity's daily quota (zerogpu.schedule.quota), then places it
on a free slice or queues it. Each time capacity comes back, waiting calls are
served in policy order (zerogpu.schedule.policy) with two refinements:

- Backfill: when the first waiting `xlarge` call finds no whole GPU, the GPU
  that will drain first is reserved for it; later calls may still use the free
  slices of the others, and of the reserved one if their duration ends before
  it drains, so the reservation costs no utilization it does not need.
- Warm workers: a lease released with `park=` stays held by the caller's idle
  worker; the same function asking again gets it back (`warm=True`), and a
  waiting call that needs its capacity gets it by calling `park()`, which
  kills the worker, from a thread of its own.

The scheduler of a process is the node daemon's when ZEROGPU_SCHEDULER names
its socket (zerogpu.schedule.client), else an EmbeddedScheduler of its own.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from itertools import count

from .. import settings
from ..cuda.devices import Device, discover
from ..errors import Cancelled, InvalidArgument, NoGPUAvailable, SchedulerError
from ..identity import Identity
from .policy import SIZES, Policy, is_number
from .quota import Owner, QuotaLedger, Reservation, new_id, next_reset, this_process

__all__ = [
    "SIZES", "LeaseRequest", "Lease", "Scheduler", "EmbeddedScheduler", "Waiter",
    "scheduler", "use_scheduler", "reset_scheduler",
]

log = logging.getLogger("zerogpu.schedule.scheduler")

# How often a blocked acquire looks at its cancel event.
CANCEL_POLL = 0.01

# States of a held lease.
RUNNING = "running"      # a call runs on it
RELEASING = "releasing"  # its call ended; the charge is being written
PARKED = "parked"        # an idle warm worker holds it
EVICTING = "evicting"    # its warm worker is being killed; capacity comes back after


@dataclass(frozen=True)
class LeaseRequest:
    """What a call asks for: on whose quota, for how many seconds, how much GPU."""

    identity: Identity
    duration: float
    size: str = "large"
    key: str | None = None  # the decorated function's key: leases parked by its workers match it


@dataclass
class Lease:
    """A device (or one slice of it) held for one call."""

    id: int
    device: Device
    slot: int | None          # which slice for "large", None for "xlarge"
    memory_fraction: float    # the share of the device's memory the call may use
    request: LeaseRequest
    warm: bool = False        # handed back from an idle worker of the same key


class Scheduler(ABC):
    """What the runtime asks of a scheduler, embedded or over the daemon's socket."""

    @abstractmethod
    def acquire(self, request: LeaseRequest, *, timeout: float | None = None,
                cancel: threading.Event | None = None) -> Lease:
        """Wait for a lease.

        Raises QuotaExceeded (before queueing), InvalidArgument (illegal
        duration or size), NoGPUAvailable (nothing free within `timeout`,
        default zerogpu.settings.queue_timeout()), Cancelled (`cancel` was set).
        """

    @abstractmethod
    def release(self, lease: Lease, *, used: float, charge: bool = True,
                park: Callable[[], None] | None = None) -> None:
        """End a call, charging `used` GPU seconds unless `charge` is False.

        With `park`, an idle worker keeps the lease for the next call of the
        same key; `park()` is called, at most once and never with a lock
        held, when the capacity is wanted, and must kill that worker.
        """

    @abstractmethod
    def drop(self, lease: Lease, *, park: Callable[[], None] | None = None) -> None:
        """Return a parked lease whose worker is gone; a no-op if it is no longer parked.

        With `park`, only if the lease is still parked with that very callback:
        the lease may have gone to another call, and been parked again, since.
        """

    @abstractmethod
    def status(self) -> dict:
        """Devices, leases, the queue and today's quotas, as plain data."""

    @abstractmethod
    def close(self) -> None:
        """Stop: waiting calls get SchedulerError."""


class Held:
    """A lease the scheduler has handed out and not taken back."""

    __slots__ = ("lease", "owner", "process", "state", "since", "park", "cells")

    def __init__(self, lease: Lease, owner: Hashable, process: Owner, state: str, since: float,
                 cells: list[tuple[int, int]]) -> None:
        self.lease = lease
        self.owner = owner
        self.process = process
        self.state = state
        self.since = since
        self.park: Callable[[], None] | None = None
        self.cells = cells


class Waiter:
    """A call admitted against its quota and waiting for capacity.

    When the call got `lease` or left the queue with `error`, `done` is set
    and `on_done(waiter)` called, once and outside the scheduler's lock
    (unless it was granted at once by submit(), which returns it with `lease` set).
    """

    __slots__ = ("request", "lease_id", "owner", "process", "left", "arrival", "seq", "deadline",
                 "on_done", "done", "lease", "error")

    def __init__(self, request: LeaseRequest, lease_id: int, owner: Hashable, process: Owner,
                 left: float, arrival: float, seq: int, deadline: float,
                 on_done: Callable[[Waiter], None] | None) -> None:
        self.request = request
        self.lease_id = lease_id
        self.owner = owner
        self.process = process
        self.left = left
        self.arrival = arrival
        self.seq = seq
        self.deadline = deadline
        self.on_done = on_done
        self.done: threading.Event | None = None
        self.lease: Lease | None = None
        self.error: BaseException | None = None

    def priority(self, policy: Policy, now: float) -> tuple:
        request = self.request
        return (*policy.priority(request.identity.tier, self.left, request.duration, self.arrival, now), self.seq)


class EmbeddedScheduler(Scheduler):
    """The scheduler inside one process; the node daemon runs one for the machine.

    `owner` (submit's) groups a caller's leases: warm leases match only their
    own owner's calls, and abandon(owner) returns all of them. `process` is
    the caller's process, recorded with its quota reservation.
    """

    def __init__(
        self,
        devices: list[Device] | None = None,
        *,
        policy: Policy | None = None,
        ledger: QuotaLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.devices = list(devices) if devices is not None else discover()
        if not self.devices:
            raise SchedulerError(
                "no GPU to schedule: none is visible (check CUDA_VISIBLE_DEVICES), "
                "or set ZEROGPU_BACKEND=emulated to emulate one"
            )
        if ledger is not None and policy is not None and ledger.policy != policy:
            raise InvalidArgument("the scheduler and its quota ledger must share one policy")
        self.ledger = ledger or QuotaLedger(policy=policy)
        self.policy = self.ledger.policy
        self.clock = clock
        self._lock = threading.Lock()
        self._cells: list[list[int | None]] = [[None] * self.policy.large_per_gpu for _ in self.devices]
        self._held: dict[int, Held] = {}
        self._waiters: dict[int, Waiter] = {}
        self._seq = count()
        self._closed = False
        self.ledger.sweep()

    # -- the interface ----------------------------------------------------------

    def acquire(self, request: LeaseRequest, *, timeout: float | None = None,
                cancel: threading.Event | None = None) -> Lease:
        timeout = settings.queue_timeout() if timeout is None else timeout
        check_timeout(timeout)
        waiter = self.submit(request, timeout=timeout)
        if waiter.lease is not None:
            return waiter.lease
        done = waiter.done
        deadline = time.monotonic() + timeout
        try:
            while not done.is_set():
                left = deadline - time.monotonic()
                if cancel is not None and cancel.is_set():
                    reason: BaseException = Cancelled(f"{describe(request)} left the GPU queue: its caller gave up")
                elif left <= 0:
                    reason = self._no_gpu(request, timeout)
                else:
                    done.wait(min(left, CANCEL_POLL) if cancel is not None else left)
                    continue
                if not self.withdraw(waiter, reason):
                    done.wait()  # served meanwhile: its lease is being recorded
        except BaseException:
            # Interrupted while waiting (Ctrl-C): leave the queue, or give back
            # the lease that came meanwhile, which nobody would release.
            if not self.withdraw(waiter, Cancelled(f"{describe(request)} was interrupted while it waited")):
                done.wait()
                if waiter.error is None:
                    self.release(waiter.lease, used=0.0, charge=False)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.lease

    def submit(
        self,
        request: LeaseRequest,
        *,
        timeout: float,
        on_done: Callable[[Waiter], None] | None = None,
        owner: Hashable = None,
        process: Owner | None = None,
    ) -> Waiter:
        """Admit `request` and grant it now, or queue it until capacity comes back.

        Returns the Waiter; its `lease` is set when it was granted at once.
        Otherwise `on_done` is called later with the outcome. Raises
        InvalidArgument and QuotaExceeded before anything is held.
        """
        if not isinstance(request, LeaseRequest) or not isinstance(request.identity, Identity):
            raise InvalidArgument(f"expected a LeaseRequest with an Identity, not {request!r}")
        if request.key is not None and not isinstance(request.key, str):
            raise InvalidArgument(f"a request's key must be a string or None, not {request.key!r}")
        self.policy.check(request.identity.tier, request.duration, request.size)
        check_timeout(timeout)
        process = process or this_process()
        now = self.clock()
        with self._lock:
            self._check_open()
            held = None if self._waiters else self._take_now(request, owner, process, now)
        lease_id = held.lease.id if held is not None else new_id()
        cell = held.cells[0] if held is not None else (None, None)
        try:
            lease_id, left = self.ledger.admit(
                request.identity, request.duration, request.size, process,
                lease_id=lease_id, device=cell[0], slot=cell[1] if request.size == "large" else None,
            )
        except BaseException:
            if held is not None:
                self._give_back(held)
            raise
        waiter = Waiter(request, lease_id, owner, process, left, now, next(self._seq), now + timeout, on_done)
        if held is not None:
            held.park = None
            waiter.lease = held.lease
            return waiter
        waiter.done = threading.Event()  # only a call that waits needs one
        with self._lock:
            if self._closed:
                granted, evicted = [], []
                waiter.error = SchedulerError("the scheduler was closed")
            else:
                self._waiters[waiter.seq] = waiter
                granted, evicted = self._schedule()
        if waiter.error is not None:
            self.ledger.settle(lease_id, None)
            raise waiter.error
        self._notify(granted, evicted, but=waiter)
        return waiter

    def withdraw(self, waiter: Waiter, error: BaseException) -> bool:
        """Take a waiting call out of the queue with `error`; False if it was already served."""
        with self._lock:
            if self._waiters.pop(waiter.seq, None) is None:
                return False
            waiter.error = error
            granted, evicted = self._schedule()
        self._settle(waiter.lease_id, None)
        self._notify(granted, evicted)
        self._finish(waiter)
        return True

    def expire(self) -> int:
        """Send NoGPUAvailable to the waiting calls past their queue timeout; return how many."""
        now = self.clock()
        with self._lock:
            late = [w for w in self._waiters.values() if w.deadline <= now]
        for waiter in late:
            self.withdraw(waiter, self._no_gpu(waiter.request, waiter.deadline - waiter.arrival))
        return len(late)

    def release(self, lease: Lease, *, used: float, charge: bool = True,
                park: Callable[[], None] | None = None) -> None:
        if not is_number(used) or not math.isfinite(used) or used < 0:
            raise InvalidArgument(f"used must be a non-negative number of seconds, not {used!r}")
        with self._lock:
            held = self._held.get(lease.id)
            if held is None or held.state != RUNNING:
                raise SchedulerError(f"lease {lease.id} is not running here: was it released twice?")
            held.state = RELEASING
        settled = False
        try:
            self._settle(lease.id, used if charge else None)
            settled = True
        finally:
            with self._lock:
                # Parked only once its charge is recorded: a failed release frees the lease.
                if settled and park is not None and not self._closed and self._held.get(lease.id) is held:
                    held.state = PARKED
                    held.park = park
                    held.since = self.clock()
                else:
                    self._free(held)
                granted, evicted = self._schedule()
            self._notify(granted, evicted)

    def drop(self, lease: Lease, *, park: Callable[[], None] | None = None) -> None:
        with self._lock:
            held = self._held.get(lease.id)
            if held is None or held.state not in (PARKED, EVICTING):
                return
            if park is not None and held.park is not park:
                return
            self._free(held)
            granted, evicted = self._schedule()
        self._notify(granted, evicted)

    def abandon(self, owner: Hashable, *, settle: bool = True) -> int:
        """Return everything `owner` holds or waits for, uncharged (its process is gone).

        With settle=False the quota reservations stay in the ledger (the
        daemon stopping: its next run takes them over). Returns the number of
        leases returned.
        """
        with self._lock:
            waiting = [w for w in self._waiters.values() if w.owner == owner]
            for waiter in waiting:
                del self._waiters[waiter.seq]
                waiter.error = SchedulerError("the caller went away")
            held = [h for h in self._held.values() if h.owner == owner]
            for h in held:
                self._free(h)
            granted, evicted = self._schedule()
        if settle:
            for lease_id in [w.lease_id for w in waiting] + [h.lease.id for h in held if h.state == RUNNING]:
                self._settle(lease_id, None)
        for waiter in waiting:
            self._finish(waiter)
        self._notify(granted, evicted)
        return len(held)

    def adopt(self, reservations: list[Reservation], owner: Callable[[Owner], Hashable]) -> int:
        """Hold again the leases a previous run of this scheduler handed out.

        Reservations of live processes that were placed on a free cell become
        running leases owned by `owner(process)`; the others are settled
        uncharged. Returns the number adopted.
        """
        now, wall = self.clock(), time.time()
        stale = []
        adopted = 0
        with self._lock:
            for row in reservations:
                cells = self._cells_of(row)
                if cells is None or not all(self._cells[d][s] is None for d, s in cells) or not row.owner.alive():
                    stale.append(row.id)
                    continue
                request = LeaseRequest(row.identity, row.duration, row.size)
                lease = Lease(row.id, self.devices[row.device], row.slot if row.size == "large" else None,
                              self._fraction(row.size), request)
                held = Held(lease, owner(row.owner), row.owner, RUNNING, now - max(wall - row.started, 0.0), cells)
                self._occupy(held)
                adopted += 1
        for lease_id in stale:
            self._settle(lease_id, None)
        return adopted

    def transfer(self, old: Hashable, new: Hashable, *, only: set[int] | None = None) -> int:
        """Give the leases `old` holds (those in `only`, if given) to `new`; return how many."""
        with self._lock:
            moved = [h for h in self._held.values() if h.owner == old and (only is None or h.lease.id in only)]
            for h in moved:
                h.owner = new
        return len(moved)

    def lease(self, lease_id: int) -> Lease:
        """The lease handed out under `lease_id`; SchedulerError if none is."""
        with self._lock:
            held = self._held.get(lease_id)
        if held is None:
            raise SchedulerError(f"lease {lease_id} is not held here")
        return held.lease

    def holder(self, lease_id: int) -> tuple[Hashable, Owner] | None:
        """Who holds `lease_id` and for which process (None when nobody does)."""
        with self._lock:
            held = self._held.get(lease_id)
        return None if held is None else (held.owner, held.process)

    def owners(self) -> set[Hashable]:
        """Everyone who holds a lease or waits for one."""
        with self._lock:
            return {h.owner for h in self._held.values()} | {w.owner for w in self._waiters.values()}

    def close(self, *, settle: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiters.values())
            self._waiters.clear()
            running = [h.lease.id for h in self._held.values() if h.state == RUNNING]
        for waiter in waiting:
            waiter.error = SchedulerError("the scheduler was closed while the call waited for a GPU")
            self._settle(waiter.lease_id, None)
            self._finish(waiter)
        if settle:
            for lease_id in running:
                self._settle(lease_id, None)
        self.ledger.close()

    # -- what is going on -------------------------------------------------------------

    def status(self) -> dict:
        now, wall = self.clock(), time.time()
        with self._lock:
            leases = [
                {
                    "id": h.lease.id, "user": h.lease.request.identity.user, "tier": h.lease.request.identity.tier,
                    "size": h.lease.request.size, "device": h.lease.device.index, "slot": h.lease.slot,
                    "duration": h.lease.request.duration, "held": now - h.since, "state": h.state,
                    "key": h.lease.request.key, "pid": h.process.pid,
                }
                for h in self._held.values()
            ]
            queue = [
                {
                    "user": w.request.identity.user, "tier": w.request.identity.tier, "size": w.request.size,
                    "duration": w.request.duration, "waited": now - w.arrival, "pid": w.process.pid,
                }
                for w in sorted(self._waiters.values(), key=lambda w: w.priority(self.policy, now))
            ]
            cells = [list(row) for row in self._cells]
        return {
            "devices": [
                {"index": d.index, "visible_id": d.visible_id, "name": d.name, "total_memory": d.total_memory,
                 "backend": d.backend, "slots": cells[d.index]}
                for d in self.devices
            ],
            "leases": leases,
            "queue": queue,
            "quota": [b.describe() for b in self.ledger.balances()],
            "resets_at": next_reset(wall),
            "policy": self.policy.describe(),
        }

    # -- placing calls (lock held) --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerError("the scheduler is closed")

    def _take_now(self, request: LeaseRequest, owner: Hashable, process: Owner, now: float) -> Held | None:
        """With no one waiting: the caller's own parked lease, else free capacity, else None."""
        held = self._parked_for(request, owner)
        if held is not None:
            # Keep held.park until the call is admitted: a refusal parks it again.
            held.state = RUNNING
            held.since = now
            held.lease = Lease(held.lease.id, held.lease.device, held.lease.slot, held.lease.memory_fraction,
                               request, warm=True)
            return held
        spot = self._spot(request.size, self._is_free, {}, request.duration, now)
        if spot is None:
            return None
        held = self._new_held(new_id(), request, owner, process, spot, now)
        self._occupy(held)
        return held

    def _give_back(self, held: Held) -> None:
        """Undo a grant whose admission failed: a warm lease goes back to its worker."""
        with self._lock:
            if held.lease.warm and held.park is not None and not self._closed:
                held.state = PARKED
            else:
                self._free(held)
            granted, evicted = self._schedule()
        self._notify(granted, evicted)

    def _parked_for(self, request: LeaseRequest, owner: Hashable) -> Held | None:
        if request.key is None:
            return None
        for held in self._held.values():
            parked = held.lease.request
            if (held.state == PARKED and held.owner == owner and parked.key == request.key
                    and parked.size == request.size):
                return held
        return None

    def _is_free(self, device: int, slot: int) -> bool:
        return self._cells[device][slot] is None

    def _state_at(self, device: int, slot: int) -> str | None:
        lease_id = self._cells[device][slot]
        return None if lease_id is None else self._held[lease_id].state

    def _spot(self, size: str, usable: Callable[[int, int], bool], reserved: dict[int, float],
              duration: float, now: float) -> tuple[int, list[int]] | None:
        """Where a call of `size` fits using cells for which `usable` holds.

        An xlarge call needs every slice of a device not reserved for another
        call. A large call takes a slice of the fullest device that has one
        (keeping whole devices free for xlarge calls), and may use a reserved
        device only if it ends before that device drains.
        """
        slots = range(self.policy.large_per_gpu)
        if size == "xlarge":
            for device in range(len(self.devices)):
                if device not in reserved and all(usable(device, s) for s in slots):
                    return device, list(slots)
            return None
        best: tuple[int, int] | None = None
        best_free = 0
        for device in range(len(self.devices)):
            if device in reserved and now + duration > reserved[device]:
                continue
            free = [s for s in slots if usable(device, s)]
            if free and (best is None or len(free) < best_free):
                best, best_free = (device, free[0]), len(free)
        return (best[0], [best[1]]) if best is not None else None

    def _drain_time(self, device: int, now: float) -> float:
        """When every call on `device` will have reached its duration."""
        ends = [now]
        for lease_id in self._cells[device]:
            if lease_id is not None and self._held[lease_id].state in (RUNNING, RELEASING):
                held = self._held[lease_id]
                ends.append(held.since + held.lease.request.duration)
        return max(ends)

    def _schedule(self) -> tuple[list[Waiter], list[Held]]:
        """Serve waiting calls in policy order; return those granted and the leases to evict."""
        granted: list[Waiter] = []
        evicted: list[Held] = []
        if not self._waiters or self._closed:
            return granted, evicted
        now = self.clock()
        claimed: set[tuple[int, int]] = set()
        reserved: dict[int, float] = {}
        xlarge_reserved = False

        def free(d: int, s: int) -> bool:
            return self._cells[d][s] is None and (d, s) not in claimed

        def coming(d: int, s: int) -> bool:
            return (d, s) not in claimed and self._state_at(d, s) in (None, EVICTING)

        def reclaimable(d: int, s: int) -> bool:
            return (d, s) not in claimed and self._state_at(d, s) in (None, EVICTING, PARKED)

        for waiter in sorted(self._waiters.values(), key=lambda w: w.priority(self.policy, now)):
            request = waiter.request
            warm = self._parked_for(request, waiter.owner)
            if warm is not None and not any(cell in claimed for cell in warm.cells):
                self._grant_warm(waiter, warm, now)
                granted.append(waiter)
                continue
            spot = self._spot(request.size, free, reserved, request.duration, now)
            if spot is not None:
                self._grant(waiter, spot, now)
                granted.append(waiter)
                continue
            # Capacity on its way back, or held by idle warm workers: claim it.
            spot = (self._spot(request.size, coming, reserved, request.duration, now)
                    or self._spot(request.size, reclaimable, reserved, request.duration, now))
            if spot is not None:
                device, slots = spot
                self._claim(device, slots, claimed, evicted)
                if request.size == "xlarge":
                    reserved[device] = now
                continue
            if request.size == "xlarge" and not xlarge_reserved:
                xlarge_reserved = True
                candidates = [d for d in range(len(self.devices)) if d not in reserved]
                if candidates:
                    device = min(candidates, key=lambda d: (self._drain_time(d, now), d))
                    reserved[device] = self._drain_time(device, now)
                    parked = [s for s in range(self.policy.large_per_gpu)
                              if (device, s) not in claimed and self._state_at(device, s) == PARKED]
                    self._claim(device, parked, claimed, evicted)
        return granted, evicted

    def _claim(self, device: int, slots: list[int], claimed: set, evicted: list[Held]) -> None:
        for slot in slots:
            claimed.add((device, slot))
            lease_id = self._cells[device][slot]
            if lease_id is not None and self._held[lease_id].state == PARKED:
                held = self._held[lease_id]
                held.state = EVICTING
                evicted.append(held)

    def _grant(self, waiter: Waiter, spot: tuple[int, list[int]], now: float) -> None:
        held = self._new_held(waiter.lease_id, waiter.request, waiter.owner, waiter.process, spot, now)
        self._occupy(held)
        del self._waiters[waiter.seq]
        waiter.lease = held.lease

    def _grant_warm(self, waiter: Waiter, held: Held, now: float) -> None:
        held.state = RUNNING
        held.since = now
        held.park = None
        held.lease = Lease(held.lease.id, held.lease.device, held.lease.slot, held.lease.memory_fraction,
                           waiter.request, warm=True)
        del self._waiters[waiter.seq]
        waiter.lease = held.lease

    def _new_held(self, lease_id: int, request: LeaseRequest, owner: Hashable, process: Owner,
                  spot: tuple[int, list[int]], now: float) -> Held:
        device, slots = spot
        lease = Lease(lease_id, self.devices[device], slots[0] if request.size == "large" else None,
                      self._fraction(request.size), request)
        return Held(lease, owner, process, RUNNING, now, [(device, s) for s in slots])

    def _fraction(self, size: str) -> float:
        return self.policy.memory_fraction if size == "large" else 1.0

    def _cells_of(self, row: Reservation) -> list[tuple[int, int]] | None:
        if row.device is None or not 0 <= row.device < len(self.devices):
            return None
        if row.size == "xlarge":
            return [(row.device, s) for s in range(self.policy.large_per_gpu)]
        if row.slot is None or not 0 <= row.slot < self.policy.large_per_gpu:
            return None
        return [(row.device, row.slot)]

    def _occupy(self, held: Held) -> None:
        for device, slot in held.cells:
            self._cells[device][slot] = held.lease.id
        self._held[held.lease.id] = held

    def _free(self, held: Held) -> None:
        for device, slot in held.cells:
            if self._cells[device][slot] == held.lease.id:
                self._cells[device][slot] = None
        if self._held.get(held.lease.id) is held:
            del self._held[held.lease.id]

    # -- after the lock -------------------------------------------------------------------

    def _notify(self, granted: list[Waiter], evicted: list[Held], but: Waiter | None = None) -> None:
        """Record where granted calls run, tell them, and start evicting warm workers."""
        for waiter in granted:
            self._place(waiter)
            if waiter is not but:
                self._finish(waiter)
        if evicted:
            threading.Thread(target=self._evict, args=(evicted,), name="zerogpu-evict", daemon=True).start()

    def _place(self, waiter: Waiter) -> None:
        lease = waiter.lease
        try:
            self.ledger.place(waiter.lease_id, lease.device.index, lease.slot, lease.id)
            waiter.lease_id = lease.id
        except SchedulerError:
            log.exception("could not record where lease %s runs", lease.id)

    def _finish(self, waiter: Waiter) -> None:
        if waiter.done is not None:
            waiter.done.set()
        if waiter.on_done is None:
            return
        try:
            waiter.on_done(waiter)
        except Exception:
            log.exception("a waiting call's completion callback failed")

    def _evict(self, evicted: list[Held]) -> None:
        for held in evicted:
            try:
                if held.park is not None:
                    held.park()
            except Exception:
                log.exception("evicting the warm worker of lease %s failed", held.lease.id)
            with self._lock:
                if held.state == EVICTING:
                    self._free(held)
                granted, more = self._schedule()
            self._notify(granted, more)

    def _settle(self, lease_id: int, used: float | None) -> None:
        try:
            self.ledger.settle(lease_id, used)
        except SchedulerError:
            if used is not None:
                raise
            log.exception("could not drop the quota reservation of lease %s", lease_id)

    def _no_gpu(self, request: LeaseRequest, waited: float) -> NoGPUAvailable:
        """The error of a call still in the queue after `waited` seconds."""
        with self._lock:
            busy = sum(cell is not None for row in self._cells for cell in row)
            others = max(len(self._waiters) - 1, 0)
        total = len(self.devices) * self.policy.large_per_gpu
        return NoGPUAvailable(
            f"no GPU became free for {describe(request)} within {waited:g} s "
            f"({busy} of {total} GPU slices busy, {others} more calls waiting); "
            "try again later, ask for a shorter duration, or raise ZEROGPU_QUEUE_TIMEOUT"
        )


def describe(request: LeaseRequest) -> str:
    return f"the {request.size} call of {request.identity.user!r} ({request.duration:g} s)"


def check_timeout(timeout: object) -> None:
    if not is_number(timeout) or math.isnan(timeout) or timeout < 0:
        raise InvalidArgument(f"the queue timeout must be a non-negative number of seconds, not {timeout!r}")


# -- the process's scheduler ------------------------------------------------------------

_instance: Scheduler | None = None
_instance_pid = 0
_instance_lock = threading.Lock()


def scheduler() -> Scheduler:
    """The scheduler of this process: the node daemon's client or an embedded one."""
    global _instance, _instance_pid
    with _instance_lock:
        # A forked process must not use its parent's locks, sockets or database handle.
        if _instance is None or _instance_pid != os.getpid():
            socket_path = settings.scheduler_socket()
            if socket_path:
                from .client import DaemonClient

                _instance = DaemonClient(socket_path)
            else:
                _instance = EmbeddedScheduler()
            _instance_pid = os.getpid()
        return _instance


def use_scheduler(chosen: Scheduler) -> None:
    """Make `chosen` the scheduler of this process (e.g. an EmbeddedScheduler with its own Policy)."""
    global _instance, _instance_pid
    with _instance_lock:
        previous, _instance, _instance_pid = _instance, chosen, os.getpid()
    if previous is not None and previous is not chosen:
        previous.close()


def reset_scheduler() -> None:
    """Close the scheduler of this process; the next scheduler() call makes a new one."""
    global _instance
    with _instance_lock:
        previous, _instance = _instance, None
        same_process = _instance_pid == os.getpid()
    if previous is not None and same_process:
        previous.close()
