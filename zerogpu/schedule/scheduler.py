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

Where leases sit and where calls fit is zerogpu.schedule.placement; the
scheduler of a process (this one, or the node daemon's through its client) is
chosen by zerogpu.schedule.choice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from itertools import count

from .. import settings, telemetry
from ..cuda.devices import Device, discover
from ..errors import Cancelled, InvalidArgument, NoGPUAvailable, SchedulerError
from ..identity import Identity
from ..units import check_seconds
from .leases import (
    CANCEL_POLL, EVICTING, PARKED, RELEASING, RUNNING, Held, Lease, LeaseRequest, Scheduler, Waiter,
    check_timeout, describe,
)
from .placement import Placement
from .policy import Policy
from .protocol import device_to_wire
from .ledger import open_ledger
from .quota import Owner, QuotaLedger, Reservation, new_id, next_reset, this_process

__all__ = ["EmbeddedScheduler"]

log = logging.getLogger("zerogpu.schedule.scheduler")


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
        # The ledger it opens is the app's own and writes unlimited calls behind (a daemon passes its own).
        self.ledger = ledger or open_ledger(policy=policy, write_behind=True)
        self.policy = self.ledger.policy
        self.clock = clock
        self._lock = threading.Lock()
        self._placement = Placement(self.devices, self.policy)
        self._waiters: dict[int, Waiter] = {}
        self._seq = count()
        self._closed = False
        self._busy = [0.0] * len(self.devices)  # slice-seconds of calls that ended, per GPU
        self.ledger.sweep()
        telemetry.watch(self)

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

    def overdue(self, grace: float) -> list[Held]:
        """The running leases held longer than their duration + `grace` seconds."""
        now = self.clock()
        with self._lock:
            return [held for held in self._placement.held.values()
                    if held.state == RUNNING and now - held.since > held.lease.request.duration + grace]

    def release(self, lease: Lease, *, used: float, charge: bool = True,
                park: Callable[[], None] | None = None) -> None:
        check_seconds(used, "used")
        with self._lock:
            held = self._placement.held.get(lease.id)
            if held is None or held.state != RUNNING:
                raise SchedulerError(f"lease {lease.id} is not running here: was it released twice?")
            self._count_busy(held)
            held.state = RELEASING
        settled = False
        try:
            self._settle(lease.id, used if charge else None)
            settled = True
        finally:
            with self._lock:
                # Parked only once its charge is recorded: a failed release frees the lease.
                if settled and park is not None and not self._closed and self._placement.held.get(lease.id) is held:
                    held.state = PARKED
                    held.park = park
                    held.since = self.clock()
                else:
                    self._placement.vacate(held)
                granted, evicted = self._schedule()
            self._notify(granted, evicted)

    def drop(self, lease: Lease, *, park: Callable[[], None] | None = None) -> None:
        with self._lock:
            held = self._placement.held.get(lease.id)
            if held is None or held.state not in (PARKED, EVICTING):
                return
            if park is not None and held.park is not park:
                return
            self._placement.vacate(held)
            granted, evicted = self._schedule()
        self._notify(granted, evicted)

    def abandon(self, owner: Hashable) -> int:
        """Return everything `owner` holds or waits for, uncharged (its process is gone).

        Returns the number of leases returned.
        """
        with self._lock:
            waiting = [w for w in self._waiters.values() if w.owner == owner]
            for waiter in waiting:
                del self._waiters[waiter.seq]
                waiter.error = SchedulerError("the caller went away")
            held = [h for h in self._placement.held.values() if h.owner == owner]
            for h in held:
                if h.state == RUNNING:
                    self._count_busy(h)
                self._placement.vacate(h)
            granted, evicted = self._schedule()
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
                cells = self._placement.cells_of(row)
                if cells is None or not all(self._placement.cells[d][s] is None for d, s in cells) or not row.owner.alive():
                    stale.append(row.id)
                    continue
                request = LeaseRequest(row.identity, row.duration, row.size)
                lease = Lease(row.id, self.devices[row.device], row.slot if row.size == "large" else None,
                              self._placement.fraction(row.size), request)
                held = Held(lease, owner(row.owner), row.owner, RUNNING, now - max(wall - row.started, 0.0), cells)
                self._placement.occupy(held)
                adopted += 1
        for lease_id in stale:
            self._settle(lease_id, None)
        return adopted

    def transfer(self, old: Hashable, new: Hashable, *, only: set[int] | None = None) -> int:
        """Give the leases `old` holds (those in `only`, if given) to `new`; return how many."""
        with self._lock:
            moved = [h for h in self._placement.held.values() if h.owner == old and (only is None or h.lease.id in only)]
            for h in moved:
                h.owner = new
        return len(moved)

    def lease(self, lease_id: int) -> Lease:
        """The lease handed out under `lease_id`; SchedulerError if none is."""
        with self._lock:
            held = self._placement.held.get(lease_id)
        if held is None:
            raise SchedulerError(f"lease {lease_id} is not held here")
        return held.lease

    def holder(self, lease_id: int) -> tuple[Hashable, Owner] | None:
        """Who holds `lease_id` and for which process (None when nobody does)."""
        with self._lock:
            held = self._placement.held.get(lease_id)
        return None if held is None else (held.owner, held.process)

    def owners(self) -> set[Hashable]:
        """Everyone who holds a lease or waits for one."""
        with self._lock:
            return {h.owner for h in self._placement.held.values()} | {w.owner for w in self._waiters.values()}

    def close(self, *, settle: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiters.values())
            self._waiters.clear()
            running = [h.lease.id for h in self._placement.held.values() if h.state == RUNNING]
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
                for h in self._placement.held.values()
            ]
            queue = [
                {
                    "user": w.request.identity.user, "tier": w.request.identity.tier, "size": w.request.size,
                    "duration": w.request.duration, "waited": now - w.arrival, "pid": w.process.pid,
                }
                for w in sorted(self._waiters.values(), key=lambda w: w.priority(self.policy, now))
            ]
            cells = [list(row) for row in self._placement.cells]
        return {
            "devices": [{**device_to_wire(d), "slots": cells[d.index]} for d in self.devices],
            "leases": leases,
            "queue": queue,
            "quota": [b.describe() for b in self.ledger.balances()],
            "resets_at": next_reset(wall),
            "policy": self.policy.describe(),
        }

    def gauges(self) -> dict:
        """For the metrics: leases held, calls waiting, and slice-seconds busy per GPU (a counter)."""
        now = self.clock()
        with self._lock:
            busy = list(self._busy)
            for held in self._placement.held.values():
                if held.state == RUNNING:
                    for device, _ in held.cells:
                        busy[device] += max(now - held.since, 0.0)
            return {"leases_held": len(self._placement.held), "waiting_calls": len(self._waiters),
                    "busy_slot_seconds": {self.devices[i].index: seconds for i, seconds in enumerate(busy)}}

    def _count_busy(self, held: Held) -> None:
        now = self.clock()
        for device, _ in held.cells:
            self._busy[device] += max(now - held.since, 0.0)

    # -- placing calls (lock held) --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerError("the scheduler is closed")

    def _take_now(self, request: LeaseRequest, owner: Hashable, process: Owner, now: float) -> Held | None:
        """With no one waiting: the caller's own parked lease, else free capacity, else None."""
        held = self._placement.parked_for(request, owner)
        if held is not None:
            # Keep held.park until the call is admitted: a refusal parks it again.
            self._placement.rerun(held, request, now)
            return held
        spot = self._placement.spot(request.size, self._placement.is_free, {}, request.duration, now)
        if spot is None:
            return None
        held = self._placement.new_held(new_id(), request, owner, process, spot, now)
        self._placement.occupy(held)
        return held

    def _give_back(self, held: Held) -> None:
        """Undo a grant whose admission failed: a warm lease goes back to its worker."""
        with self._lock:
            if held.lease.warm and held.park is not None and not self._closed:
                held.state = PARKED
            else:
                self._placement.vacate(held)
            granted, evicted = self._schedule()
        self._notify(granted, evicted)

    def _schedule(self) -> tuple[list[Waiter], list[Held]]:
        """Serve waiting calls in policy order; return those granted and the leases to evict."""
        if not self._waiters or self._closed:
            return [], []
        return self._placement.schedule(self._waiters, self.clock())

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
                    self._placement.vacate(held)
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
            busy = self._placement.busy()
            others = max(len(self._waiters) - 1, 0)
        total = len(self.devices) * self.policy.large_per_gpu
        return NoGPUAvailable(
            f"no GPU became free for {describe(request)} within {waited:g} s "
            f"({busy} of {total} GPU slices busy, {others} more calls waiting); "
            "try again later, ask for a shorter duration, or raise ZEROGPU_QUEUE_TIMEOUT"
        )
