"""The quota ledger: GPU seconds used per identity per day, kept in SQLite.

One file (by default under zerogpu.settings.data_dir()) is shared by every
scheduler of the machine: the node daemon and any embedded scheduler. Two
tables:

- `usage`: one row per (user, tier, day) with the quota seconds charged.
- `leases`: one row per admitted call that has not ended yet, holding its
  reservation (the quota seconds it asked for) and, once placed, its device.

A call is admitted if used + reserved + its cost fits in the daily quota;
its row is inserted in the same `BEGIN IMMEDIATE` transaction, so concurrent
admissions, in threads or processes, cannot both take the last seconds. At
the end its row is deleted and the time actually used is charged, again in
one transaction. A row whose process died is removed without a charge (no
one can tell how much of it was used).

Days are UTC days: each identity's quota comes back whole at 00:00 UTC.
Durability: WAL with synchronous=NORMAL survives the crash of any process
using the file; a power cut may lose the last charges.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from .. import settings
from ..errors import QuotaExceeded, SchedulerError
from ..identity import APP_TIER, Identity
from ..units import check_seconds
from .policy import SIZE_WEIGHT, Policy

DAY = 86400.0
T = TypeVar("T")

BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process to commit
FILE_NAME = "quota.sqlite3"
# Lease ids are random so that they stay unique across processes sharing the
# file and across daemon restarts; 52 bits keep them exact in JSON.
ID_BITS = 52

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    user TEXT NOT NULL,
    tier TEXT NOT NULL,
    day TEXT NOT NULL,
    used REAL NOT NULL,
    PRIMARY KEY (user, tier, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    tier TEXT NOT NULL,
    day TEXT NOT NULL,
    size TEXT NOT NULL,
    duration REAL NOT NULL,
    cost REAL NOT NULL,
    device INTEGER,
    slot INTEGER,
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_started REAL NOT NULL,
    started REAL NOT NULL
);
"""


def new_id() -> int:
    """A fresh random lease id."""
    return secrets.randbits(ID_BITS) or 1


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


def day_of(moment: float) -> str:
    """The UTC date of `moment`, as the ledger keys it."""
    return day_name(math.floor(moment / DAY))


@functools.lru_cache(maxsize=4)
def day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))


def next_reset(moment: float) -> float:
    """The next 00:00 UTC after `moment` (Unix time has no leap seconds)."""
    return (math.floor(moment / DAY) + 1) * DAY


def default_path() -> Path:
    return settings.data_dir() / FILE_NAME


class QuotaLedger:
    """Admits calls against their identity's daily quota and charges them at the end.

    Thread-safe; several processes may open the same file. `holder` names the
    scheduler whose leases these are (the daemon reloads its own on restart).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        policy: Policy | None = None,
        *,
        holder: str = "embedded",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.policy = policy or Policy()
        self.holder = holder
        self.clock = clock
        self._lock = threading.Lock()
        self._queued: list[Work] = []
        self._queue_lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file readable by its owner only; SQLite gives its
            # -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=BUSY_TIMEOUT)
            # Rows are tiny: small pages make each commit write less, and a
            # longer WAL between checkpoints syncs the file less often.
            db.execute("PRAGMA page_size=1024")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=4000")
            db.executescript(SCHEMA)
            return db
        except (OSError, sqlite3.Error) as error:
            if db is not None:
                db.close()
            raise SchedulerError(
                f"cannot open the quota ledger {self.path}: {error}; check that the folder is writable "
                "or set ZEROGPU_DATA_DIR to one that is"
            ) from error

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise SchedulerError("the quota ledger is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                raise SchedulerError(f"the quota ledger {self.path} failed: {error}") from error

    def _grouped(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(db)` in a write transaction shared with other threads' (group commit).

        Threads that queue work while a transaction is being written find it
        done by the next one: one BEGIN ... COMMIT for all of them, each in a
        savepoint of its own, so that one failing leaves the others' in place.
        A busy app thus pays one commit for many calls, where one each made
        the threads queue up behind SQLite's write lock.
        """
        mine = Work(work)
        with self._queue_lock:
            self._queued.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._write(batch)
        return mine.outcome()

    def _write(self, batch: list[Work]) -> None:
        """One transaction for `batch`: each piece in a savepoint; all fail if the commit does."""
        try:
            if self._db is None:
                raise SchedulerError("the quota ledger is closed")
            self._db.execute("BEGIN IMMEDIATE")
            for work in batch:
                self._db.execute("SAVEPOINT work")
                try:
                    work.value = work.run(self._db)
                except Exception as error:  # noqa: BLE001 - its caller gets it
                    self._db.execute("ROLLBACK TO work")
                    work.error = self._failure(error) if isinstance(error, sqlite3.Error) else error
                self._db.execute("RELEASE work")
            self._db.execute("COMMIT")
        except BaseException as error:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                failure: BaseException = self._failure(error)
            elif isinstance(error, SchedulerError):
                failure = error
            else:
                failure = SchedulerError(f"writing the quota ledger was interrupted ({type(error).__name__})")
            for work in batch:
                work.value, work.error = None, failure
            if not isinstance(error, (sqlite3.Error, SchedulerError)):
                raise  # Ctrl-C and the like: this thread's caller hears of it too
        finally:
            for work in batch:
                work.done = True

    def _failure(self, error: sqlite3.Error) -> SchedulerError:
        failure = SchedulerError(f"the quota ledger {self.path} failed: {error}")
        failure.__cause__ = error
        return failure

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
        swept = False
        while True:
            now = self.clock()
            day = day_of(now)

            def reserve(db: sqlite3.Connection) -> tuple[int | None, float, float, float]:
                used, reserved = self._balance(db, identity, day)
                if used + reserved + cost > limit:
                    return None, used, reserved, self._last_end(db, identity, day)
                return self._insert(db, lease_id, identity, day, size, duration, cost, owner, device, slot,
                                    now), used, reserved, now

            admitted, used, reserved, last_end = self._grouped(reserve)
            if admitted is not None:
                return admitted, limit - used - reserved
            # Reservations of processes that died count until swept: sweep once.
            if swept or not self.sweep():
                raise self._refusal(identity, duration, size, cost, limit, used, reserved, now, last_end)
            swept = True

    def _insert(self, db, lease_id, identity, day, size, duration, cost, owner, device, slot, now) -> int:
        fixed = lease_id is not None
        while True:
            chosen = lease_id if fixed else new_id()
            try:
                db.execute(
                    "INSERT INTO leases VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (chosen, identity.user, identity.tier, day, size, duration, cost, device, slot,
                     self.holder, owner.pid, owner.started, now),
                )
                return chosen
            except sqlite3.IntegrityError:
                if fixed:
                    raise SchedulerError(f"lease {lease_id} is already admitted") from None

    @staticmethod
    def _balance(db: sqlite3.Connection, identity: Identity, day: str) -> tuple[float, float]:
        row = db.execute(
            "SELECT coalesce((SELECT used FROM usage WHERE user=?1 AND tier=?2 AND day=?3), 0),"
            " (SELECT total(cost) FROM leases WHERE user=?1 AND tier=?2 AND day=?3)",
            (identity.user, identity.tier, day),
        ).fetchone()
        return row[0], row[1]

    @staticmethod
    def _last_end(db: sqlite3.Connection, identity: Identity, day: str) -> float:
        """When the last running call of `identity` must have ended: its reservation is gone by then."""
        row = db.execute(
            "SELECT max(started + duration) FROM leases WHERE user=? AND tier=? AND day=?",
            (identity.user, identity.tier, day),
        ).fetchone()
        return row[0] or 0.0

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
        with self._transaction() as db:
            db.execute(
                "UPDATE leases SET id=?, device=?, slot=? WHERE id=?",
                (lease_id if new_id is None else new_id, device, slot, lease_id),
            )

    def settle(self, lease_id: int, used: float | None) -> float:
        """End a call: drop its reservation and charge `used` seconds (None: no charge).

        The charge is the time used up to the duration asked for, times the
        size's weight; it goes to the day the call was admitted on. Returns it.
        """
        if used is not None:
            check_seconds(used, "used")
        def charge(db: sqlite3.Connection) -> float:
            row = db.execute(
                "DELETE FROM leases WHERE id=? RETURNING user, tier, day, size, duration", (lease_id,)
            ).fetchone()
            if row is None or used is None:
                return 0.0
            user, tier, day, size, duration = row
            seconds = min(used, duration) * SIZE_WEIGHT[size]
            db.execute(
                "INSERT INTO usage VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET used = used + excluded.used",
                (user, tier, day, seconds),
            )
            return seconds

        return self._grouped(charge)

    def reset(self, user: str | None = None) -> int:
        """Forget today's charges of `user` (every tier of it), or of every account; return how many had any.

        Reservations of calls running now stay: they are charged as usual when the calls end.
        """
        day = day_of(self.clock())
        with self._transaction() as db:
            if user is None:
                return db.execute("DELETE FROM usage WHERE day=?", (day,)).rowcount
            return db.execute("DELETE FROM usage WHERE day=? AND user=?", (day, user)).rowcount

    # -- what is known ----------------------------------------------------------

    def balance(self, identity: Identity) -> Balance:
        """How much of its quota `identity` has used, reserved and left today."""
        with self._transaction() as db:
            used, reserved = self._balance(db, identity, day_of(self.clock()))
        return Balance(identity, self.policy.daily_quota[identity.tier], used, reserved)

    def balances(self) -> list[Balance]:
        """Every identity that used or reserved quota today, most used first."""
        day = day_of(self.clock())
        with self._transaction() as db:
            rows = db.execute(
                "SELECT user, tier, sum(used), sum(reserved) FROM ("
                " SELECT user, tier, used, 0 AS reserved FROM usage WHERE day=?1"
                " UNION ALL SELECT user, tier, 0, cost FROM leases WHERE day=?1)"
                " GROUP BY user, tier ORDER BY sum(used) + sum(reserved) DESC, user",
                (day,),
            ).fetchall()
        return [
            Balance(Identity(user, tier), self.policy.daily_quota[tier], used, reserved)
            for user, tier, used, reserved in rows
        ]

    def reservations(self, holder: str | None = None) -> list[Reservation]:
        """Calls admitted and not ended, of one holder or of all."""
        with self._transaction() as db:
            if holder is None:
                rows = db.execute("SELECT * FROM leases ORDER BY started").fetchall()
            else:
                rows = db.execute("SELECT * FROM leases WHERE holder=? ORDER BY started", (holder,)).fetchall()
        return [
            Reservation(
                id=row[0], identity=Identity(row[1], row[2]), day=row[3], size=row[4], duration=row[5],
                cost=row[6], device=row[7], slot=row[8], holder=row[9], owner=Owner(row[10], row[11]),
                started=row[12],
            )
            for row in rows
        ]

    def sweep(self) -> int:
        """Remove, uncharged, the reservations of processes that are gone; return how many."""
        with self._transaction() as db:
            owners = db.execute("SELECT DISTINCT pid, pid_started FROM leases").fetchall()
            removed = 0
            for pid, started in owners:
                if not Owner(pid, started).alive():
                    removed += db.execute(
                        "DELETE FROM leases WHERE pid=? AND pid_started=?", (pid, started)
                    ).rowcount
            return removed

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Work:
    """A piece of a grouped write transaction, and what came of it."""

    __slots__ = ("run", "done", "value", "error")

    def __init__(self, run: Callable[[sqlite3.Connection], Any]) -> None:
        self.run = run
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


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
