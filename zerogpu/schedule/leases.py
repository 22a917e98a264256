"""What a call asks the scheduler for and what it gets back; the interface of every scheduler.

A LeaseRequest names the identity whose quota pays, the seconds the call may
run and its size; a Lease is the device (or slice of one) granted for it.
Held and Waiter are the scheduler's records of a lease handed out and of a
call waiting in its queue.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..cuda.devices import Device
from ..identity import Identity
from ..units import check_seconds
from .policy import Policy
from .quota import Owner

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

    def on_reclaim(self, lease: Lease, callback: Callable[[], None]) -> None:
        """Call `callback()` if the scheduler takes back the running `lease` (it ran past its duration
        and grace): the call's worker must then go at once. Forgotten when the lease is released.

        An embedded scheduler never takes a running lease back (the call enforces its own deadline);
        the node daemon does, for a client that keeps a lease past it.
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


def describe(request: LeaseRequest) -> str:
    return f"the {request.size} call of {request.identity.user!r} ({request.duration:g} s)"


def check_timeout(timeout: object) -> None:
    check_seconds(timeout, "the queue timeout", finite=False)
