"""FastAPI through a real uvicorn server and httpx: identities, each error status, streaming, disconnects."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware

import zerogpu
from zerogpu.identity import Identity, current
from zerogpu.integrations import fastapi as zerogpu_fastapi
from zerogpu.schedule.policy import Policy
from zerogpu.schedule.quota import this_process
from zerogpu.schedule.quota_sqlite import SQLiteLedger
from zerogpu.schedule.choice import reset_scheduler, scheduler
from zerogpu.schedule.leases import LeaseRequest
from conftest import gone

HANG_GUARD = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A uvicorn server on 127.0.0.1 in a thread of this process (where zerogpu is enabled)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        # uvicorn's own proxy_headers would rewrite the peer from X-Forwarded-For (it trusts 127.0.0.1):
        # off, so that ZEROGPU_TRUSTED_PROXIES alone decides.
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + HANG_GUARD
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(HANG_GUARD)


class HeaderUsers(AuthenticationBackend):
    """Logs in whoever sends `X-User: NAME` (for the test only: a real backend checks a password)."""

    async def authenticate(self, conn):
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


@pytest.fixture
def served(gpu):
    @zerogpu.GPU(duration=10)
    def double(x: int) -> dict:
        return {"value": 2 * x, "pid": os.getpid()}

    @zerogpu.GPU(duration=0.5)
    def overrun() -> None:
        time.sleep(30)

    @zerogpu.GPU(duration=10)
    def crash() -> None:
        os._exit(3)

    @zerogpu.GPU(duration=200)
    def long_call() -> None:
        return None

    @zerogpu.GPU(duration=30)
    def count(n: int):
        for i in range(n):
            yield f"{i}\n"

    @zerogpu.GPU(duration=30)
    async def count_async(n: int):
        for i in range(n):
            yield {"i": i}

    @zerogpu.GPU(duration=60)
    def stalls():
        yield f"{os.getpid()}\n"
        time.sleep(60)
        yield "never\n"

    @zerogpu.GPU(duration=60)
    async def stalls_async() -> None:
        import asyncio

        await asyncio.sleep(60)

    app = FastAPI()

    @app.get("/whoami")
    def whoami():
        who = current()
        return {"user": who.user, "tier": who.tier}

    @app.get("/double")
    def double_endpoint(x: int):
        return double(x)

    @app.get("/overrun")
    def overrun_endpoint():
        return overrun()

    @app.get("/crash")
    def crash_endpoint():
        return crash()

    @app.get("/long")
    def long_endpoint():
        return long_call()

    @app.get("/count")
    def count_endpoint(n: int):
        return zerogpu_fastapi.stream(count(n))

    @app.get("/count-async")
    def count_async_endpoint(n: int):
        return zerogpu_fastapi.stream(count_async, n, media_type="application/x-ndjson")

    @app.get("/stalls")
    def stalls_endpoint():
        return zerogpu_fastapi.stream(stalls)

    @app.get("/stalls-async")
    async def stalls_async_endpoint():
        return await stalls_async()

    @app.get("/double-async")
    async def double_async_endpoint(x: int):
        return await zerogpu_fastapi.run(double, x)

    zerogpu_fastapi.install(app)
    app.add_middleware(AuthenticationMiddleware, backend=HeaderUsers())  # outside zerogpu's: sets scope["user"]
    server = Server(app)
    try:
        yield server
    finally:
        server.stop()


def get(server: Server, path: str, **kwargs) -> httpx.Response:
    return httpx.get(server.url + path, timeout=HANG_GUARD, **kwargs)


def balances() -> dict[tuple[str, str], float]:
    return {(b.identity.user, b.identity.tier): b.used for b in scheduler().ledger.balances()}


def published_quotas(monkeypatch) -> None:
    """ZeroGPU's own quotas (the shared fixture raises them) for a scheduler made afresh."""
    monkeypatch.delenv("ZEROGPU_QUOTA")
    reset_scheduler()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


# -- identity ------------------------------------------------------------------------------


def test_each_address_gets_an_anonymous_account_and_pays_for_its_calls(served):
    assert get(served, "/whoami").json() == {"user": "anonymous:127.0.0.1", "tier": "anonymous"}
    answer = get(served, "/double", params={"x": 21})
    assert answer.status_code == 200 and answer.json()["value"] == 42
    assert answer.json()["pid"] != os.getpid()
    assert ("anonymous:127.0.0.1", "anonymous") in balances()


def test_forwarding_headers_count_only_from_a_trusted_proxy(served, monkeypatch):
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert get(served, "/whoami", headers=forwarded).json()["user"] == "anonymous:127.0.0.1"
    monkeypatch.setenv("ZEROGPU_TRUSTED_PROXIES", "127.0.0.0/8")
    assert get(served, "/whoami", headers=forwarded).json()["user"] == "anonymous:203.0.113.7"
    assert get(served, "/whoami", headers={"Forwarded": 'for="[2001:db8::1]:4711"'}).json()["user"] == (
        "anonymous:2001:db8::1")


def test_a_logged_in_user_gets_the_tier_zerogpu_tiers_gives(served, monkeypatch):
    monkeypatch.setenv("ZEROGPU_TIERS", "alice=pro")
    assert get(served, "/whoami", headers={"X-User": "alice"}).json() == {"user": "user:alice", "tier": "pro"}
    assert get(served, "/whoami", headers={"X-User": "bob"}).json() == {"user": "user:bob", "tier": "free"}
    get(served, "/double", params={"x": 1}, headers={"X-User": "alice"})
    assert ("user:alice", "pro") in balances()


def test_the_apps_resolver_comes_first(served):
    def by_key(request):
        key = request.headers.get("x-api-key")
        return (f"key-{key}", "pro") if key else None

    zerogpu.identify_visitors(by_key)
    try:
        who = get(served, "/whoami", headers={"X-Api-Key": "k1", "X-User": "alice"}).json()
        assert who == {"user": "visitor:key-k1", "tier": "pro"}
        assert get(served, "/whoami", headers={"X-User": "alice"}).json()["user"] == "user:alice"
    finally:
        zerogpu.identify_visitors(None)


# -- errors --------------------------------------------------------------------------------


def test_an_exhausted_quota_is_429_with_retry_after(served, monkeypatch):
    published_quotas(monkeypatch)
    ledger = scheduler().ledger
    visitor = Identity("anonymous:127.0.0.1", "anonymous")
    ledger.settle(ledger.admit(visitor, 120, "large", this_process())[0], 120)
    for path in ("/double?x=1", "/count?n=3"):  # a stream is refused before it starts, with the same status
        answer = get(served, path)
        assert answer.status_code == 429
        body = answer.json()
        assert body["error"] == "QuotaExceeded" and "Try again in" in body["detail"]
        assert 1 <= int(answer.headers["Retry-After"]) <= 86400
    assert get(served, "/double?x=1", headers={"X-User": "bob"}).status_code == 200  # bob has his own account


def test_no_gpu_within_the_queue_timeout_is_503_with_retry_after(served, monkeypatch):
    monkeypatch.setenv("ZEROGPU_QUEUE_TIMEOUT", "0")
    holder = Identity("holder", "pro")
    held = [scheduler().acquire(LeaseRequest(holder, 40, "xlarge"), timeout=0) for _ in range(2)]
    try:
        answer = get(served, "/double?x=1")
        assert answer.status_code == 503
        assert answer.json()["error"] == "NoGPUAvailable"
        assert 1 <= int(answer.headers["Retry-After"]) <= 40
    finally:
        for lease in held:
            scheduler().release(lease, used=0)


@pytest.mark.parametrize("path, status, error", [
    ("/overrun", 504, "CallTimeout"),
    ("/crash", 500, "WorkerCrashed"),
    ("/long", 400, "InvalidArgument"),
])
def test_each_failure_has_its_status_and_a_json_body(served, monkeypatch, path, status, error):
    published_quotas(monkeypatch)
    answer = get(served, path)
    assert answer.status_code == status
    assert answer.json()["error"] == error and answer.json()["detail"]
    assert "Retry-After" not in answer.headers


def test_a_visitor_cannot_ask_above_the_tier_maximum(served, monkeypatch):
    published_quotas(monkeypatch)
    assert "above the anonymous tier's maximum of 120 s" in get(served, "/long").json()["detail"]
    assert get(served, "/long", headers={"X-User": "bob"}).status_code == 200  # free: up to 210 s


# -- streaming -----------------------------------------------------------------------------


def test_a_gpu_generator_streams(served):
    with httpx.stream("GET", served.url + "/count", params={"n": 4}, timeout=HANG_GUARD) as answer:
        assert answer.status_code == 200
        assert list(answer.iter_lines()) == ["0", "1", "2", "3"]


def test_an_async_gpu_generator_streams_json_lines(served):
    answer = get(served, "/count-async", params={"n": 3})
    assert answer.headers["content-type"] == "application/x-ndjson"
    assert answer.text == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'


def test_run_awaits_a_plain_gpu_function(served):
    assert get(served, "/double-async", params={"x": 5}).json()["value"] == 10


# -- disconnects ---------------------------------------------------------------------------


def no_leases() -> bool:
    return not scheduler().status()["leases"]


# The client runs in a process of its own, as a real one does: a socket of this process
# would be inherited by the worker forked meanwhile, and closing it here would not end the connection.
LEAVING_CLIENT = """
import sys, httpx
try:
    with httpx.stream("GET", sys.argv[1], timeout=float(sys.argv[2])) as answer:
        print(next(answer.iter_lines()), flush=True)
except httpx.TimeoutException:
    print("gave up", flush=True)
"""


def leave(url: str, timeout: float) -> str:
    """Ask for `url`, read the first line (or give up after `timeout` s) and hang up."""
    done = subprocess.run([sys.executable, "-c", LEAVING_CLIENT, url, str(timeout)], capture_output=True,
                          text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()



def test_a_client_that_leaves_a_stream_cancels_its_call(served):
    pid = int(leave(served.url + "/stalls", HANG_GUARD))  # gone while the worker sleeps mid-call
    wait_until(no_leases, "the lease to come back")
    wait_until(lambda: gone(pid), "the worker to go")
    assert balances()[("anonymous:127.0.0.1", "anonymous")] < 30  # the time it ran, not the 60 s asked


def test_a_client_that_leaves_an_async_call_cancels_it(served):
    assert leave(served.url + "/stalls-async", 3) == "gave up"
    wait_until(no_leases, "the lease to come back")
    assert 2 < balances()[("anonymous:127.0.0.1", "anonymous")] < 30


# -- the example ---------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "fastapi_app.py"


def test_the_fastapi_example_serves_under_zerogpu_run(tmp_path):
    port = free_port()
    environ = {**os.environ, "ZEROGPU_BACKEND": "emulated", "ZEROGPU_DATA_DIR": str(tmp_path), "PORT": str(port)}
    for name in ("ZEROGPU_QUOTA", "ZEROGPU_APP", "ZEROGPU_SCHEDULER", "ZEROGPU_TRUSTED_PROXIES"):
        environ.pop(name, None)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "zerogpu.cli", "run", str(EXAMPLE)], env=environ,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                answer = httpx.get(url + "/classify", params={"text": "hello"}, timeout=HANG_GUARD)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example did not start serving"
                time.sleep(0.2)
        assert answer.status_code == 200
        assert answer.json()["label"] in ("negative", "neutral", "positive")
        assert httpx.get(url + "/count", params={"n": 3}, timeout=HANG_GUARD).text == "0\n1\n2\n"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(HANG_GUARD)
    ledger = SQLiteLedger(tmp_path / "quota.sqlite3", Policy())
    try:
        accounts = {b.identity for b in ledger.balances()}
    finally:
        ledger.close()
    assert accounts == {Identity("anonymous:127.0.0.1", "anonymous")}  # the visitor paid, not the app
