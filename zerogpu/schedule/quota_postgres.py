"""The quota ledger in PostgreSQL: one ledger for every node of a fleet (`--ledger postgresql://...`).

Needs psycopg 3 (`pip install zerogpu[fleet]`). The schema (tables named
zerogpu_*) is created and migrated on first use, under an advisory lock so
that nodes starting together do not race, with its version in zerogpu_meta.

An admission is one call of the function zerogpu_admit: it locks the
identity's usage row for today (SELECT ... FOR UPDATE), so admissions of
one identity from any node run one after the other, counts what is used and
reserved, and inserts the reservation if it fits; one round trip, one
transaction. A charge is one call of zerogpu_settle, written once per ticket.

A server that cannot be reached raises LedgerUnreachable (a SchedulerError):
admissions fail; the base class keeps the ends of running calls and writes
them when the server is back.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import SchedulerError
from ..identity import Identity
from .policy import SIZE_WEIGHT
from .quota import (
    CHARGES_KEPT_DAYS, DAY, DuplicateLease, LedgerUnreachable, Node, Owner, QuotaLedger, Reservation, day_of,
)
from .write_behind import Batch

SCHEMA_VERSION = 1
CONNECT_TIMEOUT = 5  # seconds to reach the server before it counts as unreachable
POOL_SIZE = 8        # connections one ledger keeps open at most
MIGRATION_LOCK = 0x7a65726f677075  # the advisory lock held while the schema is created or migrated

MIGRATIONS = {
    1: """
CREATE TABLE zerogpu_usage (
    user_name TEXT NOT NULL, tier TEXT NOT NULL, day TEXT NOT NULL, used DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (user_name, tier, day)
);
CREATE TABLE zerogpu_leases (
    id BIGINT PRIMARY KEY, user_name TEXT NOT NULL, tier TEXT NOT NULL, day TEXT NOT NULL, size TEXT NOT NULL,
    duration DOUBLE PRECISION NOT NULL, cost DOUBLE PRECISION NOT NULL, device INTEGER, slot INTEGER,
    holder TEXT NOT NULL, pid INTEGER NOT NULL, pid_started DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION NOT NULL, node TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL, ticket BIGINT NOT NULL
);
CREATE INDEX zerogpu_leases_identity ON zerogpu_leases (user_name, tier, day);
CREATE INDEX zerogpu_leases_node ON zerogpu_leases (node, holder);
CREATE TABLE zerogpu_charges (ticket BIGINT PRIMARY KEY, day TEXT NOT NULL, seconds DOUBLE PRECISION NOT NULL);
CREATE TABLE zerogpu_nodes (
    name TEXT PRIMARY KEY, devices JSONB NOT NULL, slices INTEGER NOT NULL, heartbeat DOUBLE PRECISION NOT NULL,
    timeout DOUBLE PRECISION NOT NULL, socket TEXT NOT NULL, pid INTEGER NOT NULL
);
CREATE FUNCTION zerogpu_admit(
    p_id BIGINT, p_user TEXT, p_tier TEXT, p_day TEXT, p_size TEXT, p_duration DOUBLE PRECISION,
    p_cost DOUBLE PRECISION, p_limit DOUBLE PRECISION, p_device INTEGER, p_slot INTEGER, p_holder TEXT,
    p_pid INTEGER, p_pid_started DOUBLE PRECISION, p_now DOUBLE PRECISION, p_node TEXT,
    p_expires DOUBLE PRECISION, p_ticket BIGINT,
    OUT admitted BOOLEAN, OUT used DOUBLE PRECISION, OUT reserved DOUBLE PRECISION
) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO zerogpu_usage VALUES (p_user, p_tier, p_day, 0) ON CONFLICT DO NOTHING;
    -- The identity's row, locked: another node's admission for it waits here.
    SELECT u.used INTO used FROM zerogpu_usage u
        WHERE u.user_name = p_user AND u.tier = p_tier AND u.day = p_day FOR UPDATE;
    DELETE FROM zerogpu_leases l WHERE l.user_name = p_user AND l.tier = p_tier AND l.expires < p_now;
    SELECT coalesce(sum(l.cost), 0) INTO reserved FROM zerogpu_leases l
        WHERE l.user_name = p_user AND l.tier = p_tier AND l.day = p_day;
    admitted := used + reserved + p_cost <= p_limit;
    IF admitted THEN
        INSERT INTO zerogpu_leases VALUES (p_id, p_user, p_tier, p_day, p_size, p_duration, p_cost, p_device,
            p_slot, p_holder, p_pid, p_pid_started, p_now, p_node, p_expires, p_ticket);
    END IF;
END $$;
CREATE FUNCTION zerogpu_settle(
    p_id BIGINT, p_used DOUBLE PRECISION, p_xlarge_weight DOUBLE PRECISION,
    p_user TEXT, p_tier TEXT, p_day TEXT, p_size TEXT, p_duration DOUBLE PRECISION, p_ticket BIGINT
) RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    seconds DOUBLE PRECISION;
BEGIN
    DELETE FROM zerogpu_leases WHERE id = p_id RETURNING user_name, tier, day, size, duration, ticket INTO r;
    IF NOT FOUND THEN
        IF p_user IS NULL THEN RETURN 0; END IF;  -- settled before, and nothing known of it here
        SELECT p_user AS user_name, p_tier AS tier, p_day AS day, p_size AS size, p_duration AS duration,
               p_ticket AS ticket INTO r;
    END IF;
    IF p_used IS NULL THEN RETURN 0; END IF;
    seconds := least(p_used, r.duration) * (CASE WHEN r.size = 'xlarge' THEN p_xlarge_weight ELSE 1 END);
    INSERT INTO zerogpu_charges VALUES (r.ticket, r.day, seconds) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN RETURN 0; END IF;  -- written before (a retry after an outage)
    INSERT INTO zerogpu_usage AS u VALUES (r.user_name, r.tier, r.day, seconds)
        ON CONFLICT (user_name, tier, day) DO UPDATE SET used = u.used + excluded.used;
    RETURN seconds;
END $$;
""",
}

COLUMNS = ("id, user_name, tier, day, size, duration, cost, device, slot, holder, pid, pid_started, started, "
           "node, expires, ticket")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def to_reservation(row: tuple) -> Reservation:
    return Reservation(
        id=row[0], identity=Identity(row[1], row[2]), day=row[3], size=row[4], duration=row[5], cost=row[6],
        device=row[7], slot=row[8], holder=row[9], owner=Owner(row[10], row[11]), started=row[12], node=row[13],
        expires=row[14], ticket=row[15],
    )


class PostgresLedger(QuotaLedger):
    """The ledger in the PostgreSQL database at `url` (postgresql://user:password@host:port/database)."""

    def __init__(self, url: str, policy=None, **options) -> None:
        super().__init__(policy, **options)
        try:
            import psycopg
        except ImportError:
            raise SchedulerError(
                "a PostgreSQL ledger needs psycopg 3: pip install 'zerogpu[fleet]'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.where = redact(url)
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._closed = False
        with self._connection() as db:
            self._migrate(db)
        self.start_renewing()

    # -- connections --------------------------------------------------------------------

    def _connect(self):
        psycopg = self._psycopg
        try:
            db = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                 application_name=f"zerogpu {self.node}")
            # The same trade as the SQLite engine's synchronous=NORMAL: a crash of the server may
            # lose the last fraction of a second of commits, never corrupt the ledger; each commit
            # no longer waits for its own flush to disk (tens of times faster on most disks).
            db.execute("SET synchronous_commit TO off")
            return db
        except psycopg.OperationalError as error:
            raise LedgerUnreachable(
                f"cannot reach the quota ledger {self.where}: {first_line(error)}; check that the server runs "
                "and that the URL (user, password, host, port, database) is right"
            ) from error
        except (psycopg.ProgrammingError, psycopg.InterfaceError, ValueError) as error:
            raise SchedulerError(f"the quota ledger URL {self.where} is not usable: {first_line(error)}; write "
                                 "postgresql://user:password@host:port/database") from error

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection of the pool (or a new one); a broken one is dropped, not returned."""
        if self._closed:
            raise SchedulerError("the quota ledger is closed")
        try:
            db, pooled = self._pool.get_nowait(), True
        except queue.Empty:
            db, pooled = self._connect(), False
        try:
            yield db
        except self._psycopg.Error:
            db.close()
            raise
        except BaseException:
            db.close()
            raise
        else:
            self._give_back(db)

    def _give_back(self, db) -> None:
        if self._closed or self._pool.qsize() >= POOL_SIZE or db.closed:
            db.close()
        else:
            self._pool.put(db)

    def _run(self, work: Callable[[Any], Any], *, one_statement: bool = True) -> Any:
        """`work(connection)` in one transaction. A broken connection empties the pool (the server
        restarted since they were opened, so they all are) and the work is tried once more on a new one.

        Work of one statement runs as the statement's own transaction (the connections autocommit):
        an explicit BEGIN and COMMIT would be two more round trips for every admission and charge.
        """
        psycopg = self._psycopg
        for attempt in (1, 2):
            try:
                with self._connection() as db:
                    if one_statement:
                        return work(db)
                    with db.transaction():
                        return work(db)
            except psycopg.errors.UniqueViolation as error:
                raise DuplicateLease(str(error)) from None
            except psycopg.OperationalError as error:
                self._drain()
                if attempt == 2 or isinstance(error, psycopg.errors.QueryCanceled):
                    raise LedgerUnreachable(
                        f"the quota ledger {self.where} is unreachable: {first_line(error)}") from error
            except psycopg.Error as error:
                raise SchedulerError(f"the quota ledger {self.where} failed: {first_line(error)}") from error
        raise AssertionError("not reached")

    def _drain(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def _migrate(self, db) -> None:
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                db.execute("CREATE TABLE IF NOT EXISTS zerogpu_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                row = db.execute("SELECT value FROM zerogpu_meta WHERE key='schema'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise SchedulerError(f"the quota ledger {self.where} has schema version {version}, newer "
                                         f"than this zerogpu's ({SCHEMA_VERSION}): upgrade zerogpu on this node")
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    db.execute(MIGRATIONS[step])
                db.execute("INSERT INTO zerogpu_meta VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE "
                           "SET value = excluded.value", (str(SCHEMA_VERSION),))
        except self._psycopg.Error as error:
            db.close()
            raise SchedulerError(f"cannot set up the quota ledger in {self.where}: {first_line(error)}; the "
                                 "user needs the right to create tables and functions there") from error

    # -- the engine ---------------------------------------------------------------------

    def _reserve(self, row: Reservation, limit: float, now: float) -> tuple[bool, float, float]:
        def reserve(db) -> tuple[bool, float, float]:
            return db.execute(
                "SELECT * FROM zerogpu_admit(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (row.id, row.identity.user, row.identity.tier, row.day, row.size, row.duration, row.cost, limit,
                 row.device, row.slot, row.holder, row.owner.pid, row.owner.started, now, row.node, row.expires,
                 row.ticket),
            ).fetchone()

        return tuple(self._run(reserve))

    def _place(self, lease_id: int, target: int, device: int, slot: int | None) -> None:
        self._run(lambda db: db.execute("UPDATE zerogpu_leases SET id=%s, device=%s, slot=%s WHERE id=%s",
                                        (target, device, slot, lease_id)))

    def _settle(self, lease_id: int, used: float | None, known: Reservation | None) -> float:
        k = known
        args = (lease_id, used, float(SIZE_WEIGHT["xlarge"]),
                k and k.identity.user, k and k.identity.tier, k and k.day, k and k.size, k and k.duration,
                k and k.ticket)
        return self._run(lambda db: db.execute(
            "SELECT zerogpu_settle(%s,%s,%s,%s,%s,%s,%s,%s,%s)", args).fetchone()[0])

    def _balance(self, identity: Identity, day: str) -> tuple[float, float]:
        return tuple(self._run(lambda db: db.execute(
            "SELECT coalesce((SELECT used FROM zerogpu_usage WHERE user_name=%(u)s AND tier=%(t)s AND day=%(d)s), 0),"
            " coalesce((SELECT sum(cost) FROM zerogpu_leases WHERE user_name=%(u)s AND tier=%(t)s AND day=%(d)s), 0)",
            {"u": identity.user, "t": identity.tier, "d": day}).fetchone()))

    def _last_end(self, identity: Identity, day: str) -> float:
        row = self._run(lambda db: db.execute(
            "SELECT max(started + duration) FROM zerogpu_leases WHERE user_name=%s AND tier=%s AND day=%s",
            (identity.user, identity.tier, day)).fetchone())
        return row[0] or 0.0

    def _reset(self, day: str, user: str | None) -> int:
        if user is None:
            return self._run(lambda db: db.execute("DELETE FROM zerogpu_usage WHERE day=%s", (day,)).rowcount)
        return self._run(lambda db: db.execute(
            "DELETE FROM zerogpu_usage WHERE day=%s AND user_name=%s", (day, user)).rowcount)

    def _balances(self, day: str) -> list[tuple[str, str, float, float]]:
        return self._run(lambda db: db.execute(
            "SELECT user_name, tier, sum(used), sum(reserved) FROM ("
            " SELECT user_name, tier, used, 0 AS reserved FROM zerogpu_usage WHERE day=%(d)s"
            " UNION ALL SELECT user_name, tier, 0, cost FROM zerogpu_leases WHERE day=%(d)s) AS t"
            " GROUP BY user_name, tier HAVING sum(used) + sum(reserved) > 0 OR count(*) > 0"
            " ORDER BY sum(used) + sum(reserved) DESC, user_name", {"d": day}).fetchall())

    def _write_batch(self, batch: Batch, expires: float) -> set[int]:
        def write(db) -> set[int]:
            refused = set()
            for row in batch.rows:
                # The same row written before (same ticket: an earlier try whose answer was lost) gets its
                # expiry; another row with its id refuses it.
                if not db.execute(
                    f"INSERT INTO zerogpu_leases AS l ({COLUMNS}) VALUES "
                    "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE"
                    " SET expires = excluded.expires WHERE l.ticket = excluded.ticket",
                    (row.id, row.identity.user, row.identity.tier, row.day, row.size, row.duration, row.cost,
                     row.device, row.slot, row.holder, row.owner.pid, row.owner.started, row.started, row.node,
                     expires, row.ticket),
                ).rowcount:
                    refused.add(row.id)
            for charge in batch.charges:
                if db.execute("INSERT INTO zerogpu_charges VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                              (charge.ticket, charge.day, charge.seconds)).rowcount:
                    db.execute(
                        "INSERT INTO zerogpu_usage AS u VALUES (%s,%s,%s,%s) ON CONFLICT (user_name, tier, day)"
                        " DO UPDATE SET used = u.used + excluded.used",
                        (charge.identity.user, charge.identity.tier, charge.day, charge.seconds),
                    )
            return refused

        return self._run(write, one_statement=False)

    def _reservations(self, holder: str | None) -> list[Reservation]:
        if holder is None:
            rows = self._run(lambda db: db.execute(
                f"SELECT {COLUMNS} FROM zerogpu_leases ORDER BY started").fetchall())
        else:
            rows = self._run(lambda db: db.execute(
                f"SELECT {COLUMNS} FROM zerogpu_leases WHERE holder=%s ORDER BY started", (holder,)).fetchall())
        return [to_reservation(row) for row in rows]

    def nodes(self) -> list[Node]:
        now = self.clock()
        rows = self._run(lambda db: db.execute(
            "SELECT name, devices, slices, heartbeat, timeout, socket, pid FROM zerogpu_nodes"
            " WHERE heartbeat + timeout >= %s ORDER BY name", (now,)).fetchall())
        return [Node(*row) for row in rows]

    def _sweep(self, now: float) -> int:
        def sweep(db) -> int:
            removed = db.execute("DELETE FROM zerogpu_leases WHERE expires < %s", (now,)).rowcount
            owners = db.execute("SELECT DISTINCT pid, pid_started FROM zerogpu_leases WHERE node=%s",
                                (self.node,)).fetchall()
            for pid, started in owners:
                if not Owner(pid, started).alive():
                    removed += db.execute(
                        "DELETE FROM zerogpu_leases WHERE pid=%s AND pid_started=%s AND node=%s",
                        (pid, started, self.node)).rowcount
            db.execute("DELETE FROM zerogpu_nodes WHERE heartbeat + timeout < %s", (now,))
            db.execute("DELETE FROM zerogpu_charges WHERE day < %s", (day_of(now - CHARGES_KEPT_DAYS * DAY),))
            return removed

        return self._run(sweep, one_statement=False)

    def _renew(self, now: float, expires: float) -> None:
        self._run(lambda db: db.execute(
            "UPDATE zerogpu_leases SET expires=%s WHERE node=%s AND holder=%s AND expires >= %s",
            (expires, self.node, self.holder, now)))

    def _write_node(self, node: Node) -> None:
        self._run(lambda db: db.execute(
            "INSERT INTO zerogpu_nodes VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (name) DO UPDATE SET"
            " devices=excluded.devices, slices=excluded.slices, heartbeat=excluded.heartbeat,"
            " timeout=excluded.timeout, socket=excluded.socket, pid=excluded.pid",
            (node.name, json.dumps(node.devices), node.slices, node.heartbeat, node.timeout, node.socket,
             node.pid)))

    def _forget_node(self, name: str) -> None:
        self._run(lambda db: db.execute("DELETE FROM zerogpu_nodes WHERE name=%s", (name,)))

    def _close(self) -> None:
        self._closed = True
        self._drain()


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
