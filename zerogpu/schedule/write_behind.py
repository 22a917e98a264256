"""Writing behind: the calls of identities with no daily quota, kept in memory and written in batches.

Such a call cannot be refused, so its admission waits on nothing the ledger
would answer; writing its reservation and its charge as they happen made
them two transactions of every warm call (a third of the parent's CPU per
call). An embedded scheduler's ledger keeps them here instead and writes
them every WRITE_BEHIND seconds, before this process reads the ledger, when
it closes and at exit, in one transaction:

- a reservation still running then becomes a row, as any other (status in
  another process shows it; its end is then written as any other);
- a call that ended before is never a row: only its charge is written,
  summed per identity and day under one ticket, so that a batch written
  twice (retried after an outage) counts once;
- the last write, at close or exit, takes the charges only: calls that end
  after it are written as they end, as a ledger that does not write behind
  writes them.

What another process reads is thus at most WRITE_BEHIND seconds late, and a
crash of the app loses at most that much of the charges no quota counts.
A daemon does not write behind: after a crash its successor takes over the
clients' running calls from their reservation rows, so none may be missing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..identity import Identity
from .quota_records import Reservation, new_ticket

WRITE_BEHIND = 1.0  # seconds between writes


@dataclass(frozen=True)
class Charge:
    """Quota seconds to add to one identity's day, written once per ticket."""

    ticket: int
    identity: Identity
    day: str
    seconds: float


@dataclass
class Batch:
    """What one write takes: the reservations still running and the charges of calls that ended."""

    rows: list[Reservation] = field(default_factory=list)
    charges: list[Charge] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.charges)

    def parts(self) -> list[Batch]:
        """One batch per row and per charge."""
        return [Batch([row], []) for row in self.rows] + [Batch([], [charge]) for charge in self.charges]


class Behind:
    """The reservations and charges not written yet; thread-safe.

    `hold` and `end` are the calls' side (a dict operation each); `write`
    is the writer's, one at a time. A call that ends or moves while its row
    is being written waits until no write runs: its row is then either here
    or in the ledger, where it is ended as any written row is. So is one a
    failed write may have written after all (its answer lost), and, once
    `close` made the last write, every call still held.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # held for the whole of a write; taken before _lock
        self._rows: dict[int, Reservation] = {}
        self._seconds: defaultdict[tuple[Identity, str], float] = defaultdict(float)
        self._charges: list[Charge] = []  # charges of a write that failed, with their tickets
        self._writing: set[int] = set()  # the rows a write is taking to the ledger now
        self._uncertain: set[int] = set()  # rows a failed write may have written all the same
        self._closed = False

    def hold(self, row: Reservation) -> bool:
        """Keep `row` here; False once closed (the caller writes it as usual)."""
        with self._lock:
            if self._closed:
                return False
            self._rows[row.id] = row
            return True

    def end(self, lease_id: int, seconds: float) -> bool:
        """End a held call, charging `seconds`; False if the caller must end it in the ledger."""
        def charge(row: Reservation) -> None:
            if seconds:
                self._seconds[row.identity, row.day] += seconds

        return self._apply(lease_id, charge)

    def move(self, lease_id: int, moved: Reservation) -> bool:
        """Replace a held call's row by `moved` (placed, maybe under a new id); False if the caller must
        move it in the ledger."""
        def replace(row: Reservation) -> None:
            self._rows[moved.id] = moved

        return self._apply(lease_id, replace)

    def _apply(self, lease_id: int, then: Callable[[Reservation], None]) -> bool:
        """`then(row)` for a call held here, under the lock; False if the ledger must have the change."""
        with self._lock:
            if lease_id not in self._writing:
                return self._apply_here(lease_id, then)
        # Its row is being written: with no write running, where it is cannot change.
        with self._write_lock, self._lock:
            return self._apply_here(lease_id, then)

    def _apply_here(self, lease_id: int, then: Callable[[Reservation], None]) -> bool:
        # Under _lock, with no write taking this row.
        row = self._rows.pop(lease_id, None)
        if row is None:
            return False  # written: the ledger has it
        if self._closed or lease_id in self._uncertain:
            self._uncertain.discard(lease_id)
            return False  # the ledger ends it: once per ticket, written or not
        then(row)
        return True

    def write(self, write_batch: Callable[[Batch], set[int]]) -> None:
        """Hand what is held to `write_batch(batch) -> ids of rows refused`; keep it all if that raises."""
        with self._write_lock:
            self._write(write_batch, rows=True)

    def close(self, write_batch: Callable[[Batch], set[int]]) -> None:
        """The last write, of the charges only; from now on every call goes to the ledger as it comes and
        ends. Rows held stay unwritten: their calls end in the ledger, charged from what the caller knows."""
        with self._write_lock:
            try:
                self._write(write_batch, rows=False)
            finally:
                with self._lock:
                    self._closed = True

    def _write(self, write_batch: Callable[[Batch], set[int]], *, rows: bool) -> None:
        with self._lock:
            # In a fixed order, so that two processes writing at once cannot deadlock on the same rows.
            taken = sorted(self._rows.values(), key=lambda row: row.id) if rows else []
            charges = self._charges + [Charge(new_ticket(), identity, day, seconds)
                                       for (identity, day), seconds in self._seconds.items()]
            charges.sort(key=lambda c: (c.identity.user, c.identity.tier, c.day))
            batch = Batch(taken, charges)
            for row in taken:
                del self._rows[row.id]
            self._seconds.clear()
            self._charges = []
            self._writing = {row.id for row in taken}
        try:
            refused = write_batch(batch) if batch else set()
        except BaseException:
            with self._lock:
                for row in taken:
                    self._rows.setdefault(row.id, row)
                self._uncertain |= self._writing  # a lost answer: the write may have gone through
                self._charges = batch.charges + self._charges
            raise
        else:
            with self._lock:
                for row in taken:
                    if row.id in refused:
                        self._rows.setdefault(row.id, row)
                self._uncertain -= self._writing
        finally:
            with self._lock:
                self._writing = set()
