"""`zerogpu quota reset`: the ledger's owner gives accounts their day back; nobody else can."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap

import pytest
from typer.testing import CliRunner

from zerogpu.cli import app
from zerogpu.identity import Identity
from zerogpu.schedule.client import DaemonClient
from zerogpu.schedule.policy import Policy
from zerogpu.schedule.quota import this_process
from zerogpu.schedule.quota_sqlite import SQLiteLedger

from conftest import emulated_environment

ADA = Identity("ada", "free")
GRACE = Identity("grace", "pro")
NOBODY = 65534


def charge(path: str, who: Identity, seconds: float) -> None:
    """A call of `who` that used `seconds`, as any scheduler would record it."""
    ledger = SQLiteLedger(path, Policy())
    try:
        lease, _ = ledger.admit(who, seconds, "large", this_process())
        ledger.settle(lease, seconds)
    finally:
        ledger.close()


def used(path: str) -> dict[str, float]:
    ledger = SQLiteLedger(path, Policy())
    try:
        return {b.identity.user: b.used for b in ledger.balances()}
    finally:
        ledger.close()


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    emulated_environment(monkeypatch, tmp_path)
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path.
    path = tempfile.mkdtemp(prefix="zg-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ledger(folder):
    path = os.path.join(folder, "quota.sqlite3")
    charge(path, ADA, 30)
    charge(path, GRACE, 50)
    return path


@pytest.fixture
def daemon(ledger, folder):
    sock = os.path.join(folder, "d.sock")
    proc = subprocess.Popen([sys.executable, "-m", "zerogpu.cli", "serve", "--socket", sock, "--ledger", ledger],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == f"ready {sock}\n", line + proc.stderr.read()
    yield sock
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


# -- the ledger --------------------------------------------------------------------------------


def test_reset_forgets_one_accounts_charges_or_everyones(ledger):
    assert used(ledger) == {"grace": 50, "ada": 30}
    book = SQLiteLedger(ledger, Policy())
    try:
        assert book.reset("ada") == 1
        assert book.balance(ADA).used == 0 and book.balance(ADA).left == book.balance(ADA).limit
        assert book.balance(GRACE).used == 50
        assert book.reset("nobody") == 0
        assert book.reset() == 1
        assert book.balances() == []
    finally:
        book.close()


def test_reset_leaves_running_calls_reserved(ledger):
    book = SQLiteLedger(ledger, Policy())
    try:
        lease, _ = book.admit(ADA, 20, "large", this_process())
        book.reset("ada")
        assert (book.balance(ADA).used, book.balance(ADA).reserved) == (0, 20)
        book.settle(lease, 5)
        assert book.balance(ADA).used == 5
    finally:
        book.close()


# -- zerogpu quota reset -------------------------------------------------------------------------


def test_the_command_resets_the_ledger_it_is_given(ledger):
    result = invoke(["quota", "reset", "ada", "--ledger", ledger])
    assert result.exit_code == 0, result.output
    assert result.stdout == "quota reset: 'ada' has its whole daily quota again\n"
    assert used(ledger) == {"grace": 50}
    result = invoke(["quota", "reset", "--ledger", ledger])
    assert result.exit_code == 0, result.output
    assert result.stdout == "quota reset: 1 account had used quota today\n"
    assert used(ledger) == {}


def test_the_command_resets_the_default_ledger(folder, monkeypatch):
    monkeypatch.setenv("ZEROGPU_DATA_DIR", folder)
    charge(os.path.join(folder, "quota.sqlite3"), ADA, 10)
    result = invoke(["quota", "reset"])
    assert result.exit_code == 0, result.output
    assert used(os.path.join(folder, "quota.sqlite3")) == {}


def test_an_account_with_nothing_to_reset_is_an_error(ledger):
    result = invoke(["quota", "reset", "bob", "--ledger", ledger])
    assert result.exit_code == 1
    assert result.stderr == ("zerogpu quota reset: 'bob' has used no quota today: nothing to reset "
                             "(`zerogpu status` lists the accounts)\n")
    assert used(ledger) == {"grace": 50, "ada": 30}


def test_a_ledger_that_is_not_there_is_one_line(folder):
    missing = os.path.join(folder, "none.sqlite3")
    result = invoke(["quota", "reset", "--ledger", missing])
    assert result.exit_code == 2
    assert result.stderr == f"zerogpu quota reset: there is no quota ledger at {missing}: no quota was used there yet\n"
    assert not os.path.exists(missing)


def test_a_socket_and_a_ledger_together_are_refused(ledger, folder):
    result = invoke(["quota", "reset", "--ledger", ledger, "--socket", os.path.join(folder, "d.sock")])
    assert result.exit_code == 2
    assert "give --socket (or ZEROGPU_SCHEDULER) or --ledger, not both" in result.stderr
    assert used(ledger) == {"grace": 50, "ada": 30}


@pytest.mark.slow
def test_through_the_daemon(daemon, ledger, monkeypatch):
    result = invoke(["quota", "reset", "grace", "--socket", daemon])
    assert result.exit_code == 0, result.output
    assert used(ledger) == {"ada": 30}
    monkeypatch.setenv("ZEROGPU_SCHEDULER", daemon)
    result = invoke(["quota", "reset"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "quota reset: 1 account had used quota today\n"
    assert used(ledger) == {}
    client = DaemonClient(daemon)
    try:
        assert client.reset_quota() == 0
    finally:
        client.close()


@pytest.mark.slow
def test_status_shows_each_accounts_use_and_when_it_resets(daemon, ledger):
    text = " ".join(invoke(["status", "--socket", daemon]).stdout.split())
    assert "Quota today (resets at 00:00 UTC, in " in text
    assert "grace │ pro │ 50.0 s │ 0.0 s │ 1450.0 s │ 1500 s" in text
    assert "ada │ free │ 30.0 s │ 0.0 s │ 180.0 s │ 210 s" in text
    assert "zerogpu quota reset [USER]" in text


# -- refused to anyone else ----------------------------------------------------------------------


def as_nobody(script: str) -> subprocess.CompletedProcess:
    """Run `script` as uid 65534: zerogpu is imported as root first (the interpreter lives under /root)."""
    source = textwrap.dedent("""
        import os, sys
        import importlib.metadata  # pydantic's plugins look for entry points at typer's first parse
        import zerogpu.cli, zerogpu.schedule.client, zerogpu.schedule.quota, zerogpu.schedule.quota_sqlite
        import zerogpu.schedule.policy
        for name in ("typer._adapters", "pydantic.plugin._loader"):  # imported by typer 0.29's first parse
            try:
                __import__(name)
            except ImportError:
                pass
        os.setgid(65534); os.setuid(65534)
    """) + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=60)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")


@pytest.mark.slow
@needs_root
def test_the_command_as_another_user_is_refused_by_the_daemons_socket(daemon, ledger, folder):
    # Let the folder's and the socket's modes through: the peer's uid must still refuse.
    os.chmod(folder, 0o711)
    os.chmod(daemon, 0o666)
    done = as_nobody(f"zerogpu.cli.app(['quota', 'reset', '--socket', {daemon!r}], prog_name='zerogpu')")
    assert done.returncode == 1, done
    assert done.stderr == (f"zerogpu quota reset: {daemon} is served by uid 0, not by this user (uid {NOBODY}): "
                           "refusing to use it\n")
    assert used(ledger) == {"grace": 50, "ada": 30}


@pytest.mark.slow
@needs_root
def test_a_reset_request_from_another_user_is_refused_by_the_daemon(daemon, ledger, folder):
    os.chmod(folder, 0o711)
    os.chmod(daemon, 0o666)
    done = as_nobody(f"""
        import socket, struct
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect({daemon!r})
        body = b'{{"op": "reset_quota", "id": 1}}'
        try:
            sock.sendall(struct.pack("!I", len(body)) + body)
            print(repr(sock.recv(100)))
        except OSError as error:
            print("error", error)
    """)
    # Closed on it: it reads nothing, or its send or read fails; nothing was reset.
    assert done.stdout.strip() == "b''" or done.stdout.startswith(("error [Errno 104]", "error [Errno 32]")), done
    assert used(ledger) == {"grace": 50, "ada": 30}
    # The same request from the daemon's own user is answered.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(daemon)
        body = b'{"op": "reset_quota", "id": 1, "user": "ada"}'
        sock.sendall(struct.pack("!I", len(body)) + body)
        assert sock.recv(100)[4:] == b'{"id":1,"ok":true,"reset":1}'
    finally:
        sock.close()
    assert used(ledger) == {"grace": 50}


@pytest.mark.slow
@needs_root
def test_the_command_as_another_user_is_refused_a_ledger_it_does_not_own(ledger, folder):
    # Even a ledger anyone could write is reset by its owner only.
    os.chmod(folder, 0o777)
    os.chmod(ledger, 0o666)
    done = as_nobody(f"zerogpu.cli.app(['quota', 'reset', '--ledger', {ledger!r}], prog_name='zerogpu')")
    assert done.returncode == 1, done
    assert done.stderr == (f"zerogpu quota reset: the quota ledger {ledger} belongs to uid 0, not to this user "
                           f"(uid {NOBODY}): only its owner may reset its quotas\n")
    assert used(ledger) == {"grace": 50, "ada": 30}
