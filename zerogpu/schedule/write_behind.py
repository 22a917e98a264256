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
  twice (retried after an outage) counts once.

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


class Behind:
    """The reservations and charges not written yet; thread-safe.

    `hold` and `end` are the calls' side (a dict operation each); `write`
    is the writer's, one at a time. A call that ends or moves while its row
    is being written waits for that write, then goes to the ledger as any
    written row does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # held for the whole of a write
        self._rows: dict[int, Reservation] = {}
        self._seconds: defaultdict[tuple[Identity, str], float] = defaultdict(float)
        self._charges: list[Charge] = []  # charges of a write that failed, with their tickets
        self._writing: set[int] = set()

    def hold(self, row: Reservation) -> None:
        with self._lock:
            self._rows[row.id] = row

    def holds(self, lease_id: int) -> bool:
        with self._lock:
            return lease_id in self._rows or lease_id in self._writing

    def end(self, lease_id: int, seconds: float | None) -> bool:
        """End a held call, charging `seconds` (None: nothing); False if its row is in the ledger."""
        return self._settled(lease_id, lambda row: self._charge(row, seconds))

    def move(self, lease_id: int, moved: Reservation) -> bool:
        """Replace a held call's row by `moved` (placed, maybe under a new id); False if it is in the ledger."""
        def replace(row: Reservation) -> None:
            self._rows[moved.id] = moved

        return self._settled(lease_id, replace)

    def _settled(self, lease_id: int, then: Callable[[Reservation], None]) -> bool:
        for attempt in (1, 2):
            with self._lock:
                row = self._rows.pop(lease_id, None)
                if row is not None:
                    then(row)
                    return True
                if lease_id not in self._writing or attempt == 2:
                    return False
            # Its row is being written: once that write is done, it is in the ledger (or back here).
            with self._write_lock:
                pass
        return False

    def _charge(self, row: Reservation, seconds: float | None) -> None:
        if seconds:
            self._seconds[row.identity, row.day] += seconds

    def write(self, write_batch: Callable[[Batch], set[int]]) -> None:
        """Hand what is held to `write_batch(batch) -> ids of rows refused`; keep it all if that raises."""
        with self._write_lock:
            with self._lock:
                batch = Batch(list(self._rows.values()), self._charges)
                batch.charges += [Charge(new_ticket(), identity, day, seconds)
                                  for (identity, day), seconds in self._seconds.items()]
                self._rows.clear()
                self._seconds.clear()
                self._charges = []
                self._writing = {row.id for row in batch.rows}
            refused: set[int] = set()
            try:
                if batch:
                    refused = write_batch(batch)
            except BaseException:
                with self._lock:
                    for row in batch.rows:
                        self._rows.setdefault(row.id, row)
                    self._charges = batch.charges + self._charges
                raise
            finally:
                with self._lock:
                    for row in batch.rows:
                        if row.id in refused:
                            self._rows.setdefault(row.id, row)
                    self._writing = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._seconds) + len(self._charges)
