"""The node daemon, run as a real process: sharing, dead clients, restarts, hostile messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest
from rich.console import Console

from conftest import ServeProcess
from zerogpu.schedule import choice
from zerogpu.schedule.client import DaemonClient
from zerogpu.errors import Cancelled, InvalidArgument, NoGPUAvailable, QuotaExceeded, SchedulerError
from zerogpu.identity import Identity
from zerogpu.schedule.protocol import MAX_FRAME, VERSION, FrameReader, decode, encode
from zerogpu.schedule.quota import this_process
from zerogpu.schedule.quota_sqlite import SQLiteLedger
from zerogpu.schedule.leases import LeaseRequest
from zerogpu.schedule.status import embedded_status, render_status, status

PRO = Identity("grace", "pro")
FREE = Identity("ada", "free")


def large(who=PRO, duration=10.0, key=None):
    return LeaseRequest(who, duration, "large", key)


def xlarge(who=PRO, duration=10.0, key=None):
    return LeaseRequest(who, duration, "xlarge", key)


class Daemon(ServeProcess):
    """A node daemon process serving 4 emulated GPUs on a socket of its own."""

    def __init__(self, folder: str, *extra: str) -> None:
        self.folder = folder
        self.ledger = os.path.join(folder, "quota.sqlite3")
        super().__init__(os.path.join(folder, "d.sock"),
                         ["--ledger", self.ledger, "--quota", "anonymous=600", "--quota", "free=600",
                          "--quota", "pro=100000", *extra],
                         gpus=4, env={"ZEROGPU_DATA_DIR": folder})


@pytest.fixture
def folder():
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path.
    path = tempfile.mkdtemp(prefix="zg-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(folder):
    running = Daemon(folder).start()
    yield running
    running.stop()


@pytest.fixture
def client(daemon):
    made = daemon.client()
    yield made
    made.close()


def run_script(socket_path: str, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process that runs `script` with the daemon on `socket_path` as its scheduler."""
    env = {**os.environ, **(env or {}), "ZEROGPU_SCHEDULER": socket_path}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout: float = 120.0, what: str = "the condition") -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


# -- serving ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_socket_is_for_its_owner_only(daemon):
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


@pytest.mark.slow
def test_leases_through_the_daemon(client):
    leases = [client.acquire(large(), timeout=0) for _ in range(3)]
    assert [(lease.device.index, lease.slot) for lease in leases] == [(0, 0), (0, 1), (1, 0)]
    assert leases[0].device.backend == "emulated" and leases[0].memory_fraction == 0.5
    whole = client.acquire(xlarge(FREE, 20), timeout=0)
    assert whole.slot is None and whole.memory_fraction == 1.0
    for lease in leases:
        client.release(lease, used=1.5)
    client.release(whole, used=2, charge=True)
    quota = {entry["user"]: entry for entry in client.status()["quota"]}
    assert quota["grace"]["used"] == pytest.approx(4.5) and quota["ada"]["used"] == pytest.approx(4)
    assert quota["ada"]["reserved"] == 0


@pytest.mark.slow
def test_errors_come_back_as_zerogpu_errors(client):
    with pytest.raises(InvalidArgument, match="above the free tier's maximum"):
        client.acquire(large(FREE, 5000), timeout=0)
    held = client.acquire(large(FREE, 500), timeout=0)
    with pytest.raises(QuotaExceeded, match="asked for 200 s but has 100 s") as caught:
        client.acquire(large(FREE, 200), timeout=0)
    assert (caught.value.requested, caught.value.left) == (200, 100) and caught.value.retry_at > time.time()
    for _ in range(3):
        client.acquire(xlarge(), timeout=0)
    client.acquire(large(), timeout=0)  # the last free slice
    with pytest.raises(NoGPUAvailable, match="within 0.2 s"):
        client.acquire(large(), timeout=0.2)
    client.release(held, used=1)
    with pytest.raises(SchedulerError, match="released twice"):
        client.release(held, used=1)


@pytest.mark.slow
def test_the_process_scheduler_uses_the_daemon_when_named(daemon, monkeypatch):
    monkeypatch.setenv("ZEROGPU_SCHEDULER", daemon.socket)
    choice.reset_scheduler()
    try:
        chosen = choice.scheduler()
        assert isinstance(chosen, DaemonClient)
        lease = chosen.acquire(large(), timeout=0)
        chosen.release(lease, used=0.5)
    finally:
        choice.reset_scheduler()


def test_a_missing_daemon_is_a_clear_error(folder):
    with pytest.raises(SchedulerError, match="cannot reach the node daemon.*zerogpu serve"):
        DaemonClient(os.path.join(folder, "nobody.sock"))


@pytest.mark.slow
def test_apps_share_the_gpus_and_wait_for_each_other(daemon, client):
    holder = run_script(daemon.socket, """
        import sys
        from zerogpu.schedule.choice import scheduler
        from zerogpu.schedule.leases import LeaseRequest
        from zerogpu.identity import Identity
        leases = [scheduler().acquire(LeaseRequest(Identity("bob", "pro"), 30, "xlarge"), timeout=0)
                  for _ in range(4)]
        print("held", flush=True)
        sys.stdin.readline()
        for lease in leases:
            scheduler().release(lease, used=0.5)
        scheduler().status()  # the releases went before this answer
    """)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NoGPUAvailable):
            client.acquire(large(), timeout=0)
        got = []
        waiter = threading.Thread(target=lambda: got.append(client.acquire(large(), timeout=20)))
        waiter.start()
        wait_for(lambda: client.status()["queue"] != [], what="queueing behind the other app")
        assert not got
        holder.stdin.write("go\n")
        holder.stdin.flush()
        waiter.join(10)
        assert got and got[0].device.index == 0
        client.release(got[0], used=0.1)
        assert holder.wait(10) == 0
        assert [e["used"] for e in client.status()["quota"] if e["user"] == "bob"] == [4.0]
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()


HOLD = """
    import os, sys, time
    from zerogpu.schedule.choice import scheduler
    from zerogpu.schedule.leases import LeaseRequest
    from zerogpu.identity import Identity
    for _ in range(4):
        scheduler().acquire(LeaseRequest(Identity("bob", "pro"), 100, "xlarge"), timeout=0)
    if sys.argv[1] == "fork":
        child = os.fork()
        if child == 0:  # a worker that outlives its parent, with the socket inherited
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plain", "fork"])
def test_leases_of_a_killed_client_come_back_uncharged(folder, how):
    # Clients stay silent for far longer than the test waits before the daemon would give up on
    # them: leases that come back at all came back because the daemon saw the process die.
    daemon = Daemon(folder, "--heartbeat-timeout", "600").start()
    client = daemon.client()
    holder = run_script(daemon.socket, HOLD, how)
    orphan_pid = None
    try:
        if how == "fork":
            orphan_pid = int(holder.stdout.readline())
        assert holder.stdout.readline().strip() == "held"
        assert len(client.status()["leases"]) == 4
        holder.kill()
        holder.wait()
        wait_for(lambda: client.status()["leases"] == [], what="returning the dead client's leases")
        lease = client.acquire(xlarge(), timeout=0)
        client.release(lease, used=0)
        bob = [entry for entry in client.status()["quota"] if entry["user"] == "bob"]
        assert bob == [] or (bob[0]["used"], bob[0]["reserved"]) == (0, 0)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if orphan_pid is not None:
            os.kill(orphan_pid, signal.SIGKILL)
        client.close()
        daemon.stop()


def raw_connection(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    return sock


def exchange(sock: socket.socket, payload: bytes) -> dict:
    sock.sendall(payload)
    reader = FrameReader(2**24)
    while True:
        data = sock.recv(65536)
        assert data, "the daemon closed the connection"
        reader.feed(data)
        for frame in reader.frames():
            return decode(frame)


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


@pytest.mark.slow
def test_a_silent_client_loses_its_leases_after_the_heartbeat_timeout(folder):
    daemon = Daemon(folder, "--heartbeat-timeout", "1").start()
    try:
        sock = raw_connection(daemon)
        reply = exchange(sock, encode({"op": "acquire", "id": 1, "user": "mute", "tier": "pro",
                                       "duration": 30, "size": "xlarge", "key": None, "timeout": 0}))
        assert reply["ok"] and reply["lease"]["slot"] is None
        watcher = daemon.client()
        try:
            assert len(watcher.status()["leases"]) == 1
            took = wait_for(lambda: watcher.status()["leases"] == [], what="taking back the silent client's lease")
            assert took > 0.5  # not before its timeout (how long after, load decides)
            assert sock.recv(100) == b""  # and it closed the connection
        finally:
            watcher.close()
            sock.close()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_a_client_with_a_heartbeat_keeps_its_leases(folder):
    daemon = Daemon(folder, "--heartbeat-timeout", "1").start()
    try:
        holder = DaemonClient(daemon.socket, heartbeat=0.2)
        lease = holder.acquire(large(), timeout=0)
        time.sleep(2.5)
        holder.release(lease, used=2.5)  # still held: the release is accepted
        holder.status()  # answered once the release before it on this connection is done
        watcher = daemon.client()
        assert watcher.status()["leases"] == []
        assert [e["used"] for e in watcher.status()["quota"] if e["user"] == "grace"] == [2.5]
        watcher.close()
        holder.close()
    finally:
        daemon.stop()


HOSTILE = [
    (frame(b"{not json"), "not valid JSON"),
    (frame(b"[1, 2, 3]"), "must be a JSON object"),
    (frame(b"\xff\xfe"), "not valid JSON"),
    (frame(b'{"op": "acquire", "id": 1, "duration": NaN}'), "not valid JSON"),
    (frame(b"[" * 30000), "not valid JSON"),
    (encode({"op": "format-disk", "id": 1}), "unknown request 'format-disk'"),
    (encode({"op": "ping"}), "needs an 'id'"),
    (encode({"op": "ping", "id": -4}), "needs an 'id'"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": -5, "size": "large"}),
     "positive number of seconds"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": "5", "size": "large"}),
     "'duration' must be a finite number"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": True, "size": "large"}),
     "'duration' must be a finite number"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": 1e300,
             "size": "large"}), "above the pro tier's maximum"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "root", "duration": 5, "size": "large"}),
     "tier 'root' is unknown"),
    (encode({"op": "acquire", "id": 1, "user": "x" * 5000, "tier": "pro", "duration": 5, "size": "large"}),
     "'user' must be a string of at most"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": 5, "size": "huge"}),
     "size 'huge' is unknown"),
    (encode({"op": "acquire", "id": 1, "user": "x", "tier": "pro", "duration": 5, "size": "large",
             "timeout": -1}), "queue timeout"),
    (encode({"op": "acquire", "id": 1, "user": ["x"], "tier": "pro", "duration": 5, "size": "large"}),
     "'user' must be a string"),
    (encode({"op": "release", "id": 1, "lease": 12345, "used": 1, "charge": True, "park": False}),
     "not held by this client"),
    (encode({"op": "release", "id": 1, "lease": 2**70, "used": 1, "charge": True, "park": False}),
     "'lease' must be a non-negative integer"),
    (encode({"op": "release", "id": 1, "lease": 1, "used": -1, "charge": True, "park": False}),
     "not held by this client"),
    (encode({"op": "cancel", "id": 1, "target": "everything"}), "'target' must be"),
    (encode({"op": "hello", "id": 1, "version": VERSION + 1}), "speaks protocol"),
]


@pytest.mark.slow
def test_malformed_and_hostile_messages_get_an_error_and_the_daemon_goes_on(daemon, client):
    sock = raw_connection(daemon)
    try:
        for payload, message in HOSTILE:
            reply = exchange(sock, payload)
            assert reply["ok"] is False, payload[:80]
            assert message in reply["error"]["message"], (payload[:80], reply)
        reply = exchange(sock, encode({"op": "ping", "id": 9}))
        assert reply == {"id": 9, "ok": True}
    finally:
        sock.close()
    lease = client.acquire(large(), timeout=0)
    client.release(lease, used=0.1)
    assert client.status()["leases"] == []


@pytest.mark.slow
def test_an_oversized_frame_ends_that_connection_only(daemon, client):
    sock = raw_connection(daemon)
    try:
        reply = exchange(sock, struct.pack("!I", MAX_FRAME + 1) + b"x" * 100)
        assert reply["ok"] is False and "over the limit" in reply["error"]["message"]
        assert sock.recv(100) == b""
    finally:
        sock.close()
    sock = raw_connection(daemon)
    try:
        sock.sendall(struct.pack("!I", 2**32 - 1))
        sock.shutdown(socket.SHUT_WR)
        data = sock.recv(65536)
        assert b"over the limit" in data
    finally:
        sock.close()
    assert client.status()["daemon"]["pid"] == daemon.proc.pid


@pytest.mark.slow
def test_a_frame_in_pieces_and_frames_together_are_read_alike(daemon):
    sock = raw_connection(daemon)
    try:
        payload = encode({"op": "ping", "id": 1}) + encode({"op": "ping", "id": 2})
        for byte in payload[:-1]:
            sock.sendall(bytes([byte]))
        sock.sendall(payload[-1:])
        reader = FrameReader(2**20)
        replies = []
        while len(replies) < 2:
            reader.feed(sock.recv(65536))
            replies += [decode(f) for f in reader.frames()]
        assert replies == [{"id": 1, "ok": True}, {"id": 2, "ok": True}]
    finally:
        sock.close()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_connection_from_another_user_is_refused(daemon, client):
    # Let the folder's and the socket's modes through: SO_PEERCRED must still refuse.
    os.chmod(daemon.folder, 0o711)
    os.chmod(daemon.socket, 0o666)
    script = textwrap.dedent(f"""
        import os, socket, struct
        os.setgid(65534); os.setuid(65534)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect({daemon.socket!r})
        body = b'{{"op": "ping", "id": 1}}'
        try:
            sock.sendall(struct.pack("!I", len(body)) + body)
            print(repr(sock.recv(100)))
        except OSError as error:
            print("error", error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    # Closed on it: it reads nothing, or its send or read fails.
    assert out.stdout.strip() == "b''" or out.stdout.startswith(("error [Errno 104]", "error [Errno 32]")), out
    assert client.status()["daemon"]["clients"] == [os.getpid()]


@pytest.mark.slow
def test_a_second_daemon_on_the_same_socket_is_refused(daemon):
    other = Daemon(daemon.folder)
    with pytest.raises(AssertionError, match="already serves"):
        other.start()
    other.stop()


@pytest.mark.slow
def test_a_stale_socket_file_is_replaced(folder):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(folder, "d.sock"))
    stale.close()  # a socket file nobody listens on
    daemon = Daemon(folder).start()
    try:
        client = daemon.client()
        client.release(client.acquire(large(), timeout=0), used=0)
        client.close()
    finally:
        daemon.stop()
    assert not os.path.exists(os.path.join(folder, "d.sock"))


# -- restarts --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_restart_loses_no_quota_and_keeps_leases_of_live_clients(folder):
    daemon = Daemon(folder).start()
    client = daemon.client()
    try:
        done = client.acquire(large(FREE, 100), timeout=0)
        client.release(done, used=40)
        running = client.acquire(xlarge(FREE, 100), timeout=0)
        daemon.stop()
        daemon.start()
        state = client.status()  # connects again, naming the lease it holds
        assert [(lease["id"], lease["device"], lease["size"]) for lease in state["leases"]] == [
            (running.id, running.device.index, "xlarge")]
        ada = [e for e in state["quota"] if e["user"] == "ada"][0]
        assert (ada["used"], ada["reserved"]) == (40, 200)
        client.release(running, used=10)
        wait_for(lambda: client.status()["leases"] == [], what="the release after the restart")
        ada = [e for e in client.status()["quota"] if e["user"] == "ada"][0]
        assert (ada["used"], ada["reserved"]) == (60, 0)
    finally:
        client.close()
        daemon.stop()


@pytest.mark.slow
def test_leases_a_restarted_client_does_not_name_come_back(folder):
    daemon = Daemon(folder).start()
    try:
        # A lease the daemon granted to this process, whose answer was lost when it stopped.
        ledger = SQLiteLedger(daemon.ledger, holder=f"daemon:{daemon.socket}")
        ledger.admit(FREE, 50, "xlarge", this_process(), device=2)
        ledger.close()
        daemon.stop()
        daemon.start()  # takes the lease over: this process is alive
        client = daemon.client()  # says hello holding nothing
        try:
            state = client.status()
            assert state["leases"] == [] and all(e["reserved"] == 0 for e in state["quota"])
        finally:
            client.close()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_a_release_while_the_daemon_is_down_is_sent_when_it_is_back(folder):
    daemon = Daemon(folder).start()
    client = daemon.client()
    try:
        lease = client.acquire(large(FREE, 100), timeout=0)
        daemon.stop(signal.SIGKILL)
        client.release(lease, used=5)  # nobody to tell yet
        daemon.start()
        client.release(client.acquire(large(FREE, 1), timeout=0), used=1)
        watcher = daemon.client()
        wait_for(lambda: watcher.status()["leases"] == [], what="the late release")
        ada = [e for e in watcher.status()["quota"] if e["user"] == "ada"][0]
        assert (ada["used"], ada["reserved"]) == (6, 0)
        watcher.close()
    finally:
        client.close()
        daemon.stop()


# -- warm leases, cancelling, many callers ------------------------------------------------------


@pytest.mark.slow
def test_the_daemon_evicts_an_idle_worker_of_one_app_for_another(daemon, client):
    evicted = threading.Event()
    leases = [client.acquire(xlarge(key="f"), timeout=0) for _ in range(4)]
    for lease in leases[1:]:
        client.release(lease, used=1)
    leases = [leases[0]] + [client.acquire(xlarge(key="g"), timeout=0) for _ in range(3)]
    client.release(leases[0], used=1, park=evicted.set)
    again = client.acquire(xlarge(key="f"), timeout=0)
    assert again.warm and again.id == leases[0].id and not evicted.is_set()
    client.release(again, used=1, park=evicted.set)
    other = daemon.client()
    try:
        lease = other.acquire(large(FREE, 5), timeout=10)
        assert evicted.is_set() and lease.device.index == leases[0].device.index
        other.release(lease, used=1)
    finally:
        other.close()


@pytest.mark.slow
def test_a_cancelled_call_leaves_the_daemons_queue(client):
    for _ in range(4):
        client.acquire(xlarge(), timeout=0)
    cancel = threading.Event()
    outcome = []

    def wait():
        try:
            client.acquire(large(FREE, 30), timeout=30, cancel=cancel)
        except Cancelled as error:
            outcome.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: client.status()["queue"] != [], what="queueing")
    cancel.set()
    thread.join(5)
    assert outcome and client.status()["queue"] == []


@pytest.mark.slow
def test_many_concurrent_callers_through_the_daemon(client):
    guard = threading.Lock()
    taken: dict[tuple[int, int], int] = {}
    problems: list[str] = []
    outcomes = {"done": 0, "NoGPUAvailable": 0}

    def call(i: int) -> None:
        size = "xlarge" if i % 4 == 0 else "large"
        try:
            lease = client.acquire(LeaseRequest(Identity(f"u{i % 7}", "pro"), 5, size), timeout=20)
        except NoGPUAvailable:
            with guard:
                outcomes["NoGPUAvailable"] += 1
            return
        cells = [(lease.device.index, s) for s in ([lease.slot] if size == "large" else [0, 1])]
        with guard:
            for cell in cells:
                if cell in taken:
                    problems.append(f"{cell} given twice")
                taken[cell] = lease.id
        time.sleep(0.005)
        with guard:
            for cell in cells:
                taken.pop(cell, None)
            outcomes["done"] += 1
        client.release(lease, used=0.005)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert problems == [] and outcomes == {"done": 200, "NoGPUAvailable": 0}
    wait_for(lambda: client.status()["leases"] == [], what="the last releases")


# -- status ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_shows_gpus_leases_queue_and_quota(daemon, client):
    held = [client.acquire(xlarge(FREE, 50), timeout=0) for _ in range(4)]
    client.release(held.pop(), used=3)
    held.append(client.acquire(xlarge(FREE, 50), timeout=0))
    waiter = threading.Thread(target=lambda: pytest.raises(NoGPUAvailable, client.acquire, large(PRO, 7),
                                                           timeout=1))
    waiter.start()
    wait_for(lambda: client.status()["queue"] != [], what="queueing")
    state = status(daemon.socket)
    assert state["source"] == "daemon" and len(state["devices"]) == 4
    assert [entry["user"] for entry in state["queue"]] == ["grace"]
    assert {lease["user"] for lease in state["leases"]} == {"ada"}
    ada = [e for e in state["quota"] if e["user"] == "ada"][0]
    assert (ada["used"], ada["reserved"], ada["left"]) == (6, 400, 194)
    console = Console(width=120, record=True)
    console.print(render_status(state))
    text = console.export_text()
    for part in ("GPUs", "Emulated GPU 3", "Leases", "Queue", "grace", "Quota today", "194.0 s", "xlarge",
                 f"pid {daemon.proc.pid}"):
        assert part in text, part
    waiter.join(5)


def test_status_without_a_daemon_reads_the_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROGPU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "2")
    monkeypatch.delenv("ZEROGPU_SCHEDULER", raising=False)
    ledger = SQLiteLedger()
    lease_id, _ = ledger.admit(FREE, 30, "large", this_process(), device=1, slot=1)
    done, _ = ledger.admit(PRO, 30, "large", this_process())
    ledger.settle(done, 12)
    try:
        state = status()
        assert state["source"] == "ledger"
        assert state["devices"][1]["slots"] == [None, lease_id]
        assert [(lease["id"], lease["state"]) for lease in state["leases"]] == [(lease_id, "running")]
        assert {e["user"]: e["used"] for e in state["quota"]} == {"grace": 12, "ada": 0}
        console = Console(width=120, record=True)
        console.print(render_status(state))
        assert "no node daemon" in console.export_text()
        assert embedded_status(ledger)["quota"] == state["quota"]
    finally:
        ledger.close()


def test_wire_frames_round_trip():
    message = {"op": "acquire", "id": 3, "user": "é", "duration": 1.5, "key": None}
    reader = FrameReader()
    reader.feed(encode(message))
    assert [decode(f) for f in reader.frames()] == [message]
    assert json.loads(encode(message)[4:]) == message


@pytest.mark.slow
def test_decorated_calls_of_two_apps_share_the_daemons_gpus_and_evict_idle_workers(daemon):
    app = """
        import os, sys
        import zerogpu
        zerogpu.enable()
        calls = [zerogpu.GPU(duration=20, size="xlarge")(lambda: os.getpid()) for _ in range(int(sys.argv[1]))]
        print(" ".join(str(call()) for call in calls), flush=True)  # each leaves a warm worker
        sys.stdin.readline()
    """
    env = {"ZEROGPU_BACKEND": "emulated", "ZEROGPU_IDLE_TIMEOUT": "60"}
    first = run_script(daemon.socket, app, "4", env=env)
    second = None
    try:
        idle = [int(pid) for pid in first.stdout.readline().split()]
        assert len(set(idle)) == 4  # four workers, idle, holding all four GPUs
        second = run_script(daemon.socket, app, "1", env=env)
        (served,) = second.stdout.readline().split()  # an idle worker of the first app made room
        assert int(served) not in idle
        wait_for(lambda: sum(map(running, idle)) == 3, what="the eviction of one idle worker")
    finally:
        for app_process in filter(None, (first, second)):
            app_process.stdin.close()
            assert app_process.wait(20) == 0
            app_process.stdout.close()


# -- no client delays another; busy is not gone; durations hold ---------------------------------


def test_a_client_that_stops_reading_delays_no_other(folder):
    # A heartbeat timeout this long: only the writer per connection can keep the others going.
    daemon = Daemon(folder, "--heartbeat-timeout", "600").start()
    holder = daemon.client()
    stalled = raw_connection(daemon)
    try:
        held = [holder.acquire(xlarge(duration=60)) for _ in range(4)]
        stalled.sendall(encode({"op": "acquire", "id": 1, "user": "mute", "tier": "pro", "duration": 30,
                                "size": "xlarge", "key": None, "timeout": 300}))
        wait_for(lambda: len(holder.status()["queue"]) == 1, what="the stalled client's call waiting")
        # Ask for replies and read none, until the daemon stops reading this connection.
        ping = encode({"op": "ping", "id": 2})
        stalled.settimeout(2)
        try:
            while True:
                stalled.sendall(ping * 256)
        except (TimeoutError, OSError):
            pass  # its buffers are full (or the daemon dropped it)
        holder.release(held[0], used=1.0)  # grants the stalled client's call: a reply it will not read
        # Answered in turn, not after the stalled client's timeout (the reply timeout is the hang guard).
        assert {lease["user"] for lease in holder.status()["leases"]} <= {"grace", "mute"}
        for lease in held[1:]:
            holder.release(lease, used=1.0)
        stalled.close()
        wait_for(lambda: holder.status()["leases"] == [], timeout=60, what="the stalled client's lease returning")
    finally:
        stalled.close()
        holder.close()
        daemon.stop()


def all_threads_stopped(pid: int) -> bool:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            states.append(stat.read().rpartition(")")[2].split()[0])
    return all(state == "T" for state in states)


def fill(path: str, fillers: list) -> None:
    """Connect to `path` without blocking until its listen backlog refuses one more."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return
        fillers.append(sock)


def test_connecting_while_the_backlog_is_full_waits_and_busy_says_so(daemon):
    daemon.proc.send_signal(signal.SIGSTOP)  # accepts nothing: the listen backlog fills
    # The signal lands asynchronously, thread by thread: a thread still running (its accepting
    # one, woken by a filler) would take a connection and leave room.
    while not all_threads_stopped(daemon.proc.pid):
        time.sleep(0.01)
    fillers = []
    try:
        fill(daemon.socket, fillers)
        with pytest.raises(SchedulerError, match="busy"):
            DaemonClient(daemon.socket, connect_timeout=0.5)
        # Room comes while it waits: it connects instead of telling to start a daemon.
        threading.Timer(0.5, lambda: daemon.proc.send_signal(signal.SIGCONT)).start()
        for sock in fillers:
            threading.Timer(0.5, sock.close).start()
        made = DaemonClient(daemon.socket, connect_timeout=60)
        try:
            assert made.status()["daemon"]["pid"] == daemon.proc.pid
        finally:
            made.close()
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
        for sock in fillers:
            sock.close()


def test_the_daemon_takes_back_a_lease_past_its_duration(folder, monkeypatch):
    from zerogpu.schedule.daemon import Daemon as NodeDaemon

    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "4")
    monkeypatch.setenv("ZEROGPU_DATA_DIR", folder)
    node = NodeDaemon(os.path.join(folder, "n.sock"), ledger_path=os.path.join(folder, "q.sqlite3"),
                      reclaim_grace=0.5)
    node.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(60)
        sock.connect(node.socket_path)
        grant = exchange(sock, encode({"op": "acquire", "id": 1, "user": "anonymous", "tier": "anonymous",
                                       "duration": 1, "size": "xlarge", "key": None, "timeout": 0}))
        assert grant["ok"], grant
        lease = grant["lease"]["id"]
        reader = FrameReader(2**20)
        told = None
        while told is None:  # heartbeats keep the connection, and the lease, alive as far as they can
            sock.sendall(encode({"op": "ping", "id": 2}))
            reader.feed(sock.recv(65536))
            told = next((m for m in map(decode, reader.frames()) if m.get("op") == "expired"), None)
        assert told == {"op": "expired", "lease": lease}
        assert node.status()["leases"] == []
        # Charged its full duration; its own late release is refused, not double-counted.
        sock.sendall(encode({"op": "release", "id": 3, "lease": lease, "used": 9.0, "charge": True, "park": False}))
        late = None
        while late is None:  # replies to the pings above may come first
            reader.feed(sock.recv(65536))
            late = next((m for m in map(decode, reader.frames()) if m.get("id") == 3), None)
        assert not late["ok"]
    finally:
        sock.close()
        node.stop()


def test_a_call_whose_lease_the_daemon_takes_back_ends_and_its_worker_is_killed(folder, monkeypatch):
    from zerogpu.schedule.daemon import Daemon as NodeDaemon

    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_DATA_DIR", folder)
    node = NodeDaemon(os.path.join(folder, "n.sock"), ledger_path=os.path.join(folder, "q.sqlite3"),
                      reclaim_grace=0.5)
    node.start()
    # The caller's own grace is far longer than the daemon's: only the daemon ends this call.
    script = run_script(node.socket_path, """
        import os, time, zerogpu
        zerogpu.enable()

        @zerogpu.GPU(duration=1)
        def stuck():
            print(os.getpid(), flush=True)
            time.sleep(600)

        try:
            stuck()
        except zerogpu.CallTimeout as error:
            print("CallTimeout:", error, flush=True)
    """, env={"ZEROGPU_TIMEOUT_GRACE": "300", "ZEROGPU_IDLE_TIMEOUT": "0"})
    try:
        worker_pid = int(script.stdout.readline())
        outcome = script.stdout.readline()
        assert "took its GPU back, so its worker was killed" in outcome, outcome
        assert "@zerogpu.GPU(duration=...)" in outcome
        assert script.wait(60) == 0
        assert not running(worker_pid)
        assert node.status()["leases"] == []
        # Charged its full duration by the daemon, once: the caller's release adds nothing.
        (account,) = [row for row in node.status()["quota"] if row["tier"] == "app"]
        assert account["used"] == pytest.approx(1.0)
    finally:
        script.kill()
        script.wait()
        node.stop()


def test_a_worker_that_was_to_idle_on_a_lease_the_daemon_took_back_goes(client):
    lease = client.acquire(large(), timeout=0)
    client.expired(lease.id)  # as the daemon says it when it takes a lease back
    evicted = threading.Event()
    client.release(lease, used=1.0, park=evicted.set)  # the call ended just after: its worker would idle
    assert evicted.is_set()
