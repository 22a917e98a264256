"""The quota ledger in one SQLite file: the embedded default, shared by every scheduler of one machine.

The file (by default under zerogpu.settings.data_dir()) is readable by its
owner only. An admission runs in one `BEGIN IMMEDIATE` transaction, so
concurrent admissions, in threads or processes, cannot both take the last
seconds; threads of one process share their transactions (group commit).
Durability: WAL with synchronous=NORMAL survives the crash of any process
using the file; a power cut may lose the last charges.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from .. import settings
from ..errors import SchedulerError
from ..identity import Identity
from .quota import (
    CHARGES_KEPT_DAYS, DAY, DuplicateLease, Node, Owner, QuotaLedger, Reservation, charge_of, day_of,
)
from .write_behind import Batch

T = TypeVar("T")

BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process to commit
FILE_NAME = "quota.sqlite3"
SCHEMA_VERSION = 2

# Version 1 (before the version row): usage and leases without node, expiry or ticket.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS usage (
    user TEXT NOT NULL, tier TEXT NOT NULL, day TEXT NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (user, tier, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, tier TEXT NOT NULL, day TEXT NOT NULL, size TEXT NOT NULL,
    duration REAL NOT NULL, cost REAL NOT NULL, device INTEGER, slot INTEGER, holder TEXT NOT NULL,
    pid INTEGER NOT NULL, pid_started REAL NOT NULL, started REAL NOT NULL
);
"""
# Version 2: nodes, lease expiry, and charges keyed by the admission's ticket.
MIGRATE_V2 = """
ALTER TABLE leases ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE leases ADD COLUMN expires REAL NOT NULL DEFAULT 1e300;
ALTER TABLE leases ADD COLUMN ticket INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS leases_identity ON leases (user, tier, day);
CREATE TABLE IF NOT EXISTS charges (ticket INTEGER PRIMARY KEY, day TEXT NOT NULL, seconds REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, devices TEXT NOT NULL, slices INTEGER NOT NULL, heartbeat REAL NOT NULL,
    timeout REAL NOT NULL, socket TEXT NOT NULL, pid INTEGER NOT NULL
);
"""
COLUMNS = "id, user, tier, day, size, duration, cost, device, slot, holder, pid, pid_started, started, node, " \
          "expires, ticket"


def default_path() -> Path:
    return settings.data_dir() / FILE_NAME


def to_reservation(row: tuple) -> Reservation:
    return Reservation(
        id=row[0], identity=Identity(row[1], row[2]), day=row[3], size=row[4], duration=row[5], cost=row[6],
        device=row[7], slot=row[8], holder=row[9], owner=Owner(row[10], row[11]), started=row[12], node=row[13],
        expires=row[14] if row[14] < 1e299 else math.inf, ticket=row[15],
    )


class SQLiteLedger(QuotaLedger):
    """The ledger in the SQLite file at `path` (default: quota.sqlite3 under ZEROGPU_DATA_DIR)."""

    def __init__(self, path: str | Path | None = None, policy=None, **options) -> None:
        super().__init__(policy, **options)
        self.path = Path(path) if path is not None else default_path()
        self.where = str(self.path)
        self._lock = threading.Lock()
        self._queued: list[Work] = []
        self._queue_lock = threading.Lock()
        self._db: sqlite3.Connection | None = self._open()
        self.start_renewing()

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
            migrate(db)
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
                raise self._failure(error) from error

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
        """One transaction for `batch`: each piece in a savepoint (when there are several); all fail if the
        commit does."""
        try:
            if self._db is None:
                raise SchedulerError("the quota ledger is closed")
            self._db.execute("BEGIN IMMEDIATE")
            # Alone in its transaction, a piece needs no savepoint: its failure rolls back all there is.
            alone = len(batch) == 1
            for work in batch:
                self._apply(work, savepoint=not alone)
            if self._db.in_transaction:
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

    def _apply(self, work: Work, *, savepoint: bool) -> None:
        if savepoint:
            self._db.execute("SAVEPOINT work")
        try:
            work.value = work.run(self._db)
        except Exception as error:  # noqa: BLE001 - its caller gets it
            if self._db.in_transaction:  # SQLite may have rolled it all back itself (a full disk, say)
                self._db.execute("ROLLBACK TO work" if savepoint else "ROLLBACK")
            work.error = self._failure(error) if isinstance(error, sqlite3.Error) else error
        if savepoint:
            self._db.execute("RELEASE work")

    def _failure(self, error: sqlite3.Error) -> SchedulerError:
        failure = SchedulerError(f"the quota ledger {self.path} failed: {error}")
        failure.__cause__ = error
        return failure

    # -- the engine ---------------------------------------------------------------------

    def _reserve(self, row: Reservation, limit: float, now: float) -> tuple[bool, float, float]:
        def reserve(db: sqlite3.Connection) -> tuple[bool, float, float]:
            user, tier = row.identity.user, row.identity.tier
            db.execute("DELETE FROM leases WHERE user=? AND tier=? AND expires < ?", (user, tier, now))
            used, reserved = self._read_balance(db, row.identity, row.day)
            if used + reserved + row.cost > limit:
                return False, used, reserved
            self._insert(db, row)
            return True, used, reserved

        return self._grouped(reserve)

    @staticmethod
    def _insert(db: sqlite3.Connection, row: Reservation, *, again: bool = False) -> bool:
        """Insert `row`. With `again`, the same row written before (same ticket: an earlier try whose
        answer was lost) gets its expiry, and False says that another row has its id."""
        upsert = " ON CONFLICT (id) DO UPDATE SET expires = excluded.expires WHERE ticket = excluded.ticket"
        try:
            return db.execute(
                f"INSERT INTO leases ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?){upsert if again else ''}",
                (row.id, row.identity.user, row.identity.tier, row.day, row.size, row.duration, row.cost,
                 row.device, row.slot, row.holder, row.owner.pid, row.owner.started, row.started, row.node,
                 min(row.expires, 1e300), row.ticket),
            ).rowcount == 1
        except sqlite3.IntegrityError:
            raise DuplicateLease(row.id) from None

    @staticmethod
    def _charge(db: sqlite3.Connection, ticket: int, identity: Identity, day: str, seconds: float) -> bool:
        """Add `seconds` to the identity's day, once per ticket (0: always); False if written before."""
        if ticket and db.execute("INSERT INTO charges VALUES (?,?,?) ON CONFLICT DO NOTHING",
                                 (ticket, day, seconds)).rowcount == 0:
            return False
        db.execute(
            "INSERT INTO usage VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET used = used + excluded.used",
            (identity.user, identity.tier, day, seconds),
        )
        return True

    @staticmethod
    def _read_balance(db: sqlite3.Connection, identity: Identity, day: str) -> tuple[float, float]:
        row = db.execute(
            "SELECT coalesce((SELECT used FROM usage WHERE user=?1 AND tier=?2 AND day=?3), 0),"
            " (SELECT total(cost) FROM leases WHERE user=?1 AND tier=?2 AND day=?3)",
            (identity.user, identity.tier, day),
        ).fetchone()
        return row[0], row[1]

    def _place(self, lease_id: int, target: int, device: int, slot: int | None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE leases SET id=?, device=?, slot=? WHERE id=?", (target, device, slot, lease_id))

    def _settle(self, lease_id: int, used: float | None, known: Reservation | None) -> float:
        def charge(db: sqlite3.Connection) -> float:
            found = db.execute(f"DELETE FROM leases WHERE id=? RETURNING {COLUMNS}", (lease_id,)).fetchone()
            row = to_reservation(found) if found is not None else known
            if row is None or used is None:
                return 0.0
            seconds = charge_of(row, used)
            return seconds if self._charge(db, row.ticket, row.identity, row.day, seconds) else 0.0

        return self._grouped(charge)

    def _write_batch(self, batch: Batch, expires: float) -> set[int]:
        def write(db: sqlite3.Connection) -> set[int]:
            refused = {row.id for row in batch.rows if not self._insert(db, replace(row, expires=expires), again=True)}
            for charge in batch.charges:
                self._charge(db, charge.ticket, charge.identity, charge.day, charge.seconds)
            return refused

        return self._grouped(write)

    def _balance(self, identity: Identity, day: str) -> tuple[float, float]:
        with self._transaction() as db:
            return self._read_balance(db, identity, day)

    def _last_end(self, identity: Identity, day: str) -> float:
        with self._transaction() as db:
            row = db.execute("SELECT max(started + duration) FROM leases WHERE user=? AND tier=? AND day=?",
                             (identity.user, identity.tier, day)).fetchone()
        return row[0] or 0.0

    def _reset(self, day: str, user: str | None) -> int:
        with self._transaction() as db:
            if user is None:
                return db.execute("DELETE FROM usage WHERE day=?", (day,)).rowcount
            return db.execute("DELETE FROM usage WHERE day=? AND user=?", (day, user)).rowcount

    def _balances(self, day: str) -> list[tuple[str, str, float, float]]:
        with self._transaction() as db:
            return db.execute(
                "SELECT user, tier, sum(used), sum(reserved) FROM ("
                " SELECT user, tier, used, 0 AS reserved FROM usage WHERE day=?1"
                " UNION ALL SELECT user, tier, 0, cost FROM leases WHERE day=?1)"
                " GROUP BY user, tier ORDER BY sum(used) + sum(reserved) DESC, user",
                (day,),
            ).fetchall()

    def _reservations(self, holder: str | None) -> list[Reservation]:
        with self._transaction() as db:
            if holder is None:
                rows = db.execute(f"SELECT {COLUMNS} FROM leases ORDER BY started").fetchall()
            else:
                rows = db.execute(f"SELECT {COLUMNS} FROM leases WHERE holder=? ORDER BY started",
                                  (holder,)).fetchall()
        return [to_reservation(row) for row in rows]

    def nodes(self) -> list[Node]:
        now = self.clock()
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM nodes WHERE heartbeat + timeout >= ? ORDER BY name", (now,)).fetchall()
        return [Node(name, json.loads(devices), slices, beat, timeout, sock, pid)
                for name, devices, slices, beat, timeout, sock, pid in rows]

    def _sweep(self, now: float) -> int:
        with self._transaction() as db:
            removed = db.execute("DELETE FROM leases WHERE expires < ?", (now,)).rowcount
            owners = db.execute("SELECT DISTINCT pid, pid_started FROM leases WHERE node IN (?, '')",
                                (self.node,)).fetchall()
            for pid, started in owners:
                if not Owner(pid, started).alive():
                    removed += db.execute(
                        "DELETE FROM leases WHERE pid=? AND pid_started=? AND node IN (?, '')",
                        (pid, started, self.node),
                    ).rowcount
            db.execute("DELETE FROM nodes WHERE heartbeat + timeout < ?", (now,))
            db.execute("DELETE FROM charges WHERE day < ?", (day_of(now - CHARGES_KEPT_DAYS * DAY),))
            return removed

    def _renew(self, now: float, expires: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE leases SET expires=? WHERE node=? AND holder=? AND expires >= ?",
                       (expires, self.node, self.holder, now))

    def _write_node(self, node: Node) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?)",
                       (node.name, json.dumps(node.devices), node.slices, node.heartbeat, node.timeout,
                        node.socket, node.pid))

    def _forget_node(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM nodes WHERE name=?", (name,))

    def _close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def migrate(db: sqlite3.Connection) -> None:
    """Create the schema, or bring an older file's up to SCHEMA_VERSION (one transaction)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row else 1
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"its schema is version {version}, newer than this zerogpu's "
                                        f"({SCHEMA_VERSION}): upgrade zerogpu")
        if version < 2:
            for statement in (SCHEMA_V1 + MIGRATE_V2).split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
