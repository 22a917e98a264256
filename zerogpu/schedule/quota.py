"""The quota ledger: GPU seconds used per identity per day, and the calls holding some now.

One interface, two engines: zerogpu.schedule.quota_sqlite keeps the ledger in
a file every scheduler of one machine shares (the default);
zerogpu.schedule.quota_postgres keeps it in PostgreSQL, which every node of a
fleet shares (zerogpu.schedule.ledger opens the one a path or URL names).
Both keep:

- usage: the quota seconds charged per (user, tier, day);
- reservations: one per admitted call that has not ended yet, holding the
  quota seconds it asked for, its node, where it runs once placed, and an
  expiry its ledger renews while the node lives;
- charges: one per settled call, keyed by the ticket drawn at its admission,
  so that a charge written twice (retried after an outage) counts once;
- nodes: each node daemon, its GPUs and its last heartbeat.

A call is admitted if used + reserved + its cost fits in the daily quota, in
one transaction that no other admission of the same identity can interleave
with. At the end its reservation is dropped and the time actually used is
charged, to the day it was admitted on. Nothing is charged for a call that
zerogpu failed. A reservation whose process died (on this node) or whose node
stopped renewing it (any node) is dropped uncharged: no one can tell how much
of it was used.

Days are UTC days: each identity's quota comes back whole at 00:00 UTC.

An app's own ledger writes the calls of identities with no daily quota (the
app's account, by default) behind, in batches: see zerogpu.schedule.write_behind.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace

from .. import telemetry
from ..errors import QuotaExceeded, SchedulerError
from ..identity import APP_TIER, Identity
from ..units import check_seconds
from .policy import Policy
from .quota_records import (  # noqa: F401 - the ledger's importers take these from here
    CHARGES_KEPT_DAYS, DAY, ID_BITS, LEASE_TIMEOUT, Balance, Node, Owner, Reservation, charge_of, clock_time,
    day_name, day_of, new_id, new_ticket, next_reset, node_name, spell_seconds, this_process,
)
from .write_behind import WRITE_BEHIND, Batch, Behind

log = logging.getLogger("zerogpu.schedule.quota")


class LedgerUnreachable(SchedulerError):
    """The ledger's server cannot be reached now; a charge that met this is written later."""


class QuotaLedger(ABC):
    """Admits calls against their identity's daily quota and charges them at the end.

    Thread-safe; several processes (SQLite: of one machine; PostgreSQL: of
    any node) may share one ledger. `holder` names the scheduler whose leases
    these are (the daemon reloads its own on restart); `node` the machine.
    A thread renews this ledger's reservations every third of `lease_timeout`
    and writes the charges an outage held back. With `write_behind`, the
    calls of identities with no daily quota are written in batches (see
    zerogpu.schedule.write_behind): for an app's own embedded scheduler only.
    """

    where: str  # what the errors name: the file or the server

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        holder: str = "embedded",
        node: str | None = None,
        clock: Callable[[], float] = time.time,
        lease_timeout: float = LEASE_TIMEOUT,
        write_behind: bool = False,
    ) -> None:
        self.policy = policy or Policy()
        self.holder = holder
        self.node = node or node_name()
        self.clock = clock
        self.lease_timeout = check_seconds(lease_timeout, "lease_timeout", positive=True)
        self._mine: dict[int, Reservation] = {}  # this ledger's calls not settled yet, by lease id
        self._pending: list[tuple[Reservation, float | None]] = []  # settles an outage held back
        self._registered: Node | None = None
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._behind = Behind() if write_behind else None
        self._pid = os.getpid()  # a forked child must not write its parent's calls
        if self._behind is not None:
            # Weakly: a ledger nobody closed must not live on for its exit hook.
            self._at_exit = functools.partial(_write_last_at_exit, weakref.ref(self))
            atexit.register(self._at_exit)

    def start_renewing(self) -> None:
        """Start the thread that renews reservations (engines call it once open)."""
        self._renewer = threading.Thread(target=self._renew_loop, name="zerogpu-ledger-renew", daemon=True)
        self._renewer.start()

    # -- calls ----------------------------------------------------------------

    def admit(
        self,
        identity: Identity,
        duration: float,
        size: str,
        owner: Owner,
        *,
        lease_id: int | None = None,
        device: int | None = None,
        slot: int | None = None,
    ) -> tuple[int, float]:
        """Reserve the cost of a call; return its lease id and the quota left before it.

        Raises QuotaExceeded, saying how much was asked, how much is left and
        when enough comes back, if the cost does not fit in what is left today.
        """
        cost = self.policy.cost(duration, size)
        limit = self.policy.daily_quota[identity.tier]
        if self._behind is not None and math.isinf(limit):
            lease = self._admit_behind(identity, duration, size, cost, owner, lease_id, device, slot)
            if lease is not None:
                return lease, limit
        swept = False
        while True:
            now = self.clock()
            row = Reservation(
                id=lease_id if lease_id is not None else new_id(), identity=identity, day=day_of(now), size=size,
                duration=duration, cost=cost, device=device, slot=slot, holder=self.holder, owner=owner,
                started=now, node=self.node, expires=now + self.lease_timeout, ticket=new_ticket(),
            )
            while True:
                try:
                    admitted, used, reserved = self._reserve(row, limit, now)
                    break
                except DuplicateLease:
                    if lease_id is not None:
                        raise SchedulerError(f"lease {lease_id} is already admitted") from None
                    row = replace(row, id=new_id())
            if admitted:
                with self._state_lock:
                    self._mine[row.id] = row
                return row.id, limit - used - reserved
            # Reservations of processes that died count until swept: sweep once.
            if swept or not self.sweep():
                telemetry.quota_refused(identity.tier)
                last_end = self._last_end(identity, row.day)
                raise self._refusal(identity, duration, size, cost, limit, used, reserved, now, last_end)
            swept = True

    def _admit_behind(self, identity: Identity, duration: float, size: str, cost: float, owner: Owner,
                      lease_id: int | None, device: int | None, slot: int | None) -> int | None:
        """Admit a call of an identity with no daily quota without writing it; None once the last write
        was made (it is then admitted in the ledger, as any other)."""
        now = self.clock()
        with self._state_lock:
            row_id = lease_id if lease_id is not None else new_id()
            while row_id in self._mine:
                if lease_id is not None:
                    raise SchedulerError(f"lease {lease_id} is already admitted")
                row_id = new_id()
            row = Reservation(
                id=row_id, identity=identity, day=day_of(now), size=size, duration=duration, cost=cost,
                device=device, slot=slot, holder=self.holder, owner=owner, started=now, node=self.node,
                expires=now + self.lease_timeout, ticket=new_ticket(),
            )
            self._mine[row_id] = row
        if self._behind.hold(row):
            return row_id
        with self._state_lock:
            del self._mine[row_id]
        return None

    def _refusal(self, identity, duration, size, cost, limit, used, reserved, now, last_end) -> QuotaExceeded:
        left = max(limit - used - reserved, 0.0)
        reset = next_reset(now)
        # What the running calls hold comes back when they end; what was used, at 00:00 UTC.
        back = min(max(last_end, now + 1.0), reset) if used + cost <= limit else reset
        asked = f"{duration:g} s" if size == "large" else f"{duration:g} s of an xlarge GPU ({cost:g} s of quota)"
        figures = f"{used:g} s used, {reserved:g} s held by running calls, of {limit:g} s"
        if identity.tier == APP_TIER:
            message = (
                f"the app's own account {identity.user!r} asked for {asked} but has {left:g} s of its daily GPU "
                f"quota left ({figures}, set by ZEROGPU_QUOTA={APP_TIER}={limit:g}); raise it in ZEROGPU_QUOTA, "
                f"or leave {APP_TIER} out of it for no daily quota, or ask for a shorter duration"
            )
        else:
            message = (
                f"{identity.user!r} ({identity.tier} tier) asked for {asked} but has {left:g} s of GPU quota "
                f"left today ({figures}). Try again in {clock_time(back - now)}"
            )
        error = QuotaExceeded(message)
        error.requested = cost
        error.left = left
        error.retry_at = back
        return error

    def place(self, lease_id: int, device: int, slot: int | None, new_id: int | None = None) -> None:
        """Record where a call that waited in the queue now runs (under `new_id` if given:
        a call served by a warm worker takes that worker's lease id)."""
        target = lease_id if new_id is None else new_id
        with self._state_lock:
            row = self._mine.get(lease_id)
        moved = replace(row, id=target, device=device, slot=slot) if row is not None else None
        if moved is None or self._behind is None or not self._behind.move(lease_id, moved):
            self._place(lease_id, target, device, slot)
        with self._state_lock:
            if self._mine.pop(lease_id, None) is not None:
                self._mine[target] = moved

    def settle(self, lease_id: int, used: float | None) -> float:
        """End a call: drop its reservation and charge `used` seconds (None: no charge).

        The charge is the time used up to the duration asked for, times the
        size's weight; it goes to the day the call was admitted on. Returns it.
        While the ledger's server is unreachable the charge is kept and
        written when it is back (once: charges are keyed by ticket).
        """
        if used is not None:
            check_seconds(used, "used")
        with self._state_lock:
            known = self._mine.pop(lease_id, None)
        if known is not None and self._behind is not None:
            seconds = 0.0 if used is None else charge_of(known, used)
            if self._behind.end(lease_id, seconds):
                return seconds
        try:
            return self._settle(lease_id, used, known)
        except LedgerUnreachable as error:
            if known is None:
                raise
            log.warning("%s; the end of lease %s is written when it is back", error, lease_id)
            with self._state_lock:
                self._pending.append((known, used))
            return 0.0 if used is None else charge_of(known, used)

    def pending(self) -> int:
        """How many ends of calls wait for the ledger's server to be back."""
        with self._state_lock:
            return len(self._pending)

    def reset(self, user: str | None = None) -> int:
        """Forget today's charges of `user` (every tier of it), or of every account; return how many had any.

        Reservations of calls running now stay: they are charged as usual when the calls end.
        """
        self._write_first()
        return self._reset(day_of(self.clock()), user)

    def write_behind(self) -> None:
        """Write the calls kept behind now (see zerogpu.schedule.write_behind)."""
        if self._behind is not None and os.getpid() == self._pid:
            self._behind.write(self._write_kept)

    def _write_first(self) -> None:
        # What this process reads includes what it holds behind; a write that fails must not keep
        # it from reading the rest.
        try:
            self.write_behind()
        except SchedulerError as error:
            log.warning("the calls kept behind could not be written to %s (%s): read without them", self.where,
                        error)

    def _write_last(self) -> None:
        if self._behind is None or os.getpid() != self._pid:
            return
        try:
            self._behind.close(self._write_kept)
        except Exception as error:  # noqa: BLE001 - at close and exit: say what is lost, go on
            log.error("the last charges of accounts with no daily quota could not be written to %s; they are "
                      "lost: %s", self.where, error)

    def _write_kept(self, batch: Batch) -> set[int]:
        """Write `batch`; if the ledger refuses it (not an outage: that keeps it all for the next
        write), write its parts one by one and drop, saying so, the parts it refuses alone."""
        expires = self.clock() + self.lease_timeout
        try:
            return self._write_batch(batch, expires)
        except LedgerUnreachable:
            raise
        except SchedulerError as error:
            failure = error
        parts = batch.parts()
        if len(parts) == 1:
            self._drop(batch, failure)
            return set()
        log.warning("writing %d calls kept behind failed (%s): writing them one by one", len(parts), failure)
        refused: set[int] = set()
        for part in parts:
            try:
                refused |= self._write_batch(part, expires)
            except LedgerUnreachable:
                raise
            except SchedulerError as error:
                self._drop(part, error)
        return refused

    def _drop(self, part: Batch, error: SchedulerError) -> None:
        # A row dropped is ended in the ledger when its call ends; a charge dropped is lost.
        what = (f"the reservation of lease {part.rows[0].id}" if part.rows else
                f"the charge of {part.charges[0].seconds:g} s to {part.charges[0].identity.user!r}")
        log.error("%s could not be written to %s and is dropped: %s", what, self.where, error)

    def flush(self) -> int:
        """Write the ends of calls an outage held back; return how many are still waiting."""
        with self._state_lock:
            waiting, self._pending = self._pending, []
        left = []
        for index, (row, used) in enumerate(waiting):
            try:
                self._settle(row.id, used, row)
            except LedgerUnreachable:
                left = waiting[index:]
                break
            except SchedulerError:
                log.exception("could not write the end of lease %s", row.id)
        with self._state_lock:
            self._pending[:0] = left
            return len(self._pending)

    # -- nodes ------------------------------------------------------------------

    def register(self, devices: list[dict], slices: int, *, socket_path: str = "") -> None:
        """Enter this node in the fleet (its GPUs and slices); the renewal thread keeps it alive."""
        node = Node(self.node, devices, slices, self.clock(), self.lease_timeout, socket_path, os.getpid())
        self._write_node(node)
        self._registered = node

    def renew(self) -> None:
        """Push back the expiry of this ledger's reservations, and this node's heartbeat."""
        now = self.clock()
        self._renew(now, now + self.lease_timeout)
        if self._registered is not None:
            self._registered = replace(self._registered, heartbeat=now)
            self._write_node(self._registered)

    def _renew_loop(self) -> None:
        every = self.lease_timeout / 3
        renew_at = time.monotonic() + every
        while not self._stop.wait(min(every, WRITE_BEHIND) if self._behind is not None else every):
            self._tend("writing the calls kept behind", self.write_behind)
            if time.monotonic() >= renew_at:
                renew_at = time.monotonic() + every
                self._tend("renewing the reservations", self._renew_and_flush)

    def _renew_and_flush(self) -> None:
        self.renew()
        if self.pending():
            self.flush()

    @staticmethod
    def _tend(what: str, work: Callable[[], None]) -> None:
        try:
            work()
        except SchedulerError as error:
            log.warning("%s failed: %s", what, error)
        except Exception:
            log.exception("%s failed", what)

    def balance(self, identity: Identity) -> Balance:
        """How much of its quota `identity` has used, reserved and left today."""
        self._write_first()
        used, reserved = self._balance(identity, day_of(self.clock()))
        return Balance(identity, self.policy.daily_quota[identity.tier], used, reserved)

    def balances(self) -> list[Balance]:
        """Every identity that used or reserved quota today, most used first."""
        self._write_first()
        return [
            Balance(Identity(user, tier), self.policy.daily_quota[tier], used, reserved)
            for user, tier, used, reserved in self._balances(day_of(self.clock()))
            if tier in self.policy.daily_quota
        ]

    def reservations(self, holder: str | None = None) -> list[Reservation]:
        """Calls admitted and not ended, of one holder or of all, oldest first."""
        self._write_first()
        return self._reservations(holder)

    def sweep(self) -> int:
        """Drop, uncharged, reservations whose process is gone (this node) or that expired (any node);
        forget nodes that stopped beating. Returns how many reservations went."""
        return self._sweep(self.clock())

    def close(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(5)
        if self._behind is not None:
            atexit.unregister(self._at_exit)
            self._write_last()
        if self.pending() and self.flush():
            log.error("%d ends of calls could not be written to %s; their charges are lost",
                      self.pending(), self.where)
        if self._registered is not None:
            try:
                self._forget_node(self._registered.name)
            except SchedulerError:
                pass
            self._registered = None
        self._close()

    # -- what an engine provides --------------------------------------------------------

    @abstractmethod
    def _reserve(self, row: Reservation, limit: float, now: float) -> tuple[bool, float, float]:
        """Atomically: drop the identity's expired reservations, read used and reserved today,
        and insert `row` if its cost fits under `limit`. Raises DuplicateLease."""

    @abstractmethod
    def _place(self, lease_id: int, target: int, device: int, slot: int | None) -> None: ...

    @abstractmethod
    def _settle(self, lease_id: int, used: float | None, known: Reservation | None) -> float:
        """Drop the reservation; charge `used` (from its row, else from `known`) once per ticket."""

    @abstractmethod
    def _balance(self, identity: Identity, day: str) -> tuple[float, float]: ...

    @abstractmethod
    def _balances(self, day: str) -> list[tuple[str, str, float, float]]: ...

    @abstractmethod
    def _last_end(self, identity: Identity, day: str) -> float:
        """When the last running call of `identity` must have ended (0 for none): its reservation is gone then."""

    @abstractmethod
    def _reset(self, day: str, user: str | None) -> int:
        """Delete the usage of `day` (of `user` only, if given); return how many rows went."""

    @abstractmethod
    def _write_batch(self, batch: Batch, expires: float) -> set[int]:
        """In one transaction: insert the batch's rows (expiring at `expires`) and add its charges, each once
        per ticket. Returns the ids of rows not inserted because another row has that id."""

    @abstractmethod
    def _reservations(self, holder: str | None) -> list[Reservation]: ...

    @abstractmethod
    def nodes(self) -> list[Node]:
        """The nodes whose heartbeat is recent enough, by name."""

    @abstractmethod
    def _sweep(self, now: float) -> int: ...

    @abstractmethod
    def _renew(self, now: float, expires: float) -> None: ...

    @abstractmethod
    def _write_node(self, node: Node) -> None: ...

    @abstractmethod
    def _forget_node(self, name: str) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...


def _write_last_at_exit(ledger: weakref.ref[QuotaLedger]) -> None:
    """At exit: the last write of a ledger that writes behind, if it is still there."""
    alive = ledger()
    if alive is not None:
        alive._write_last()


class DuplicateLease(Exception):
    """An engine's answer to a lease id already in the ledger."""
