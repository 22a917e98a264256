"""What the quota ledger records, and the clock it keeps: owners, reservations, balances, nodes; UTC days.

Plain values, shared by the ledger (zerogpu.schedule.quota), its engines and
the calls it writes behind (zerogpu.schedule.write_behind).
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass

import psutil

from ..identity import Identity
from .policy import SIZE_WEIGHT

DAY = 86400.0
# Lease ids are random so that they stay unique across processes sharing the
# ledger and across daemon restarts; 52 bits keep them exact in JSON.
ID_BITS = 52
# How long a reservation outlives the last renewal of its ledger. A node
# daemon sets its own (its node timeout); an app's ledger renews every third of it.
LEASE_TIMEOUT = 30.0
CHARGES_KEPT_DAYS = 3  # charge records kept to recognise a retried charge


def new_id() -> int:
    """A fresh random lease id."""
    return secrets.randbits(ID_BITS) or 1


def new_ticket() -> int:
    """A fresh random admission ticket (a lease id is reused by a warm worker's calls; a ticket never)."""
    return secrets.randbits(62) or 1


def node_name() -> str:
    """This machine's name in the fleet: its host name."""
    return socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """The process a call runs for; its start time tells a reused pid apart."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> Owner:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            raise SchedulerError(f"process {pid} is gone") from None

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1e-3
        except psutil.Error:
            return False


_own: Owner | None = None


def this_process() -> Owner:
    """The Owner of the calling process (recomputed after a fork)."""
    global _own
    if _own is None or _own.pid != os.getpid():
        _own = Owner.of(os.getpid())
    return _own


@dataclass(frozen=True)
class Reservation:
    """An admitted call that has not ended: what it reserved and where it runs."""

    id: int
    identity: Identity
    day: str
    size: str
    duration: float
    cost: float
    device: int | None
    slot: int | None
    holder: str
    owner: Owner
    started: float
    node: str = ""
    expires: float = math.inf
    ticket: int = 0


@dataclass(frozen=True)
class Balance:
    """One identity's quota today, in quota seconds."""

    identity: Identity
    limit: float
    used: float
    reserved: float

    @property
    def left(self) -> float:
        return max(self.limit - self.used - self.reserved, 0.0)

    def describe(self) -> dict:
        """As plain data for status; None for the limit and what is left when there is no limit."""
        unlimited = math.isinf(self.limit)
        return {"user": self.identity.user, "tier": self.identity.tier,
                "limit": None if unlimited else self.limit, "used": self.used, "reserved": self.reserved,
                "left": None if unlimited else self.left}


@dataclass(frozen=True)
class Node:
    """A node daemon as the ledger knows it: its GPUs (wire dicts), slices per GPU and heartbeat."""

    name: str
    devices: list[dict]
    slices: int
    heartbeat: float
    timeout: float
    socket: str = ""
    pid: int = 0

    def alive(self, now: float) -> bool:
        return now - self.heartbeat <= self.timeout


def day_of(moment: float) -> str:
    """The UTC date of `moment`, as the ledger keys it."""
    return day_name(math.floor(moment / DAY))


@functools.lru_cache(maxsize=4)
def day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))


def next_reset(moment: float) -> float:
    """The next 00:00 UTC after `moment` (Unix time has no leap seconds)."""
    return (math.floor(moment / DAY) + 1) * DAY


def charge_of(reservation: Reservation, used: float) -> float:
    """The quota seconds a call used: its time up to the duration asked for, times its size's weight."""
    return min(used, reservation.duration) * SIZE_WEIGHT[reservation.size]


def clock_time(seconds: float) -> str:
    """'3:12:05', '0:00:40': how ZeroGPU says when a quota comes back."""
    seconds = max(int(math.ceil(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def spell_seconds(seconds: float) -> str:
    """'3 h 12 min', '4 min 10 s', '12 s'."""
    seconds = max(int(math.ceil(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
