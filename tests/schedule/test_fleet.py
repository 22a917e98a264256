"""Two node daemons as two nodes of one fleet, sharing one quota ledger on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ServeProcess, wait_until
from zerogpu.errors import QuotaExceeded, SchedulerError
from zerogpu.identity import Identity
from zerogpu.schedule.ledger import open_ledger
from zerogpu.schedule.leases import LeaseRequest

FREE = Identity("ada", "free")
PRO = Identity("grace", "pro")
NODE_TIMEOUT = 3.0

pytestmark = pytest.mark.slow  # each test starts two daemons


class Node(ServeProcess):
    """`zerogpu serve --node NAME --ledger URL` on 2 emulated GPUs, in a process of its own."""

    def __init__(self, folder, name: str, url: str) -> None:
        self.name = name
        self.url = url
        super().__init__(str(folder / f"{name}.sock"),
                         ["--ledger", url, "--node", name, "--node-timeout", str(NODE_TIMEOUT),
                          "--quota", "free=200", "--quota", "pro=100000"], gpus=2)


@pytest.fixture
def fleet(tmp_path, postgres_url):
    nodes = [Node(tmp_path, name, postgres_url) for name in ("left", "right")]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def fleet_state(url: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "zerogpu.cli", "status", "--fleet", "--ledger", url, "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_one_visitor_through_both_nodes_at_once_never_gets_more_than_the_quota(fleet, postgres_url):
    clients = [node.client() for node in fleet]
    granted, refused = [], []
    start = threading.Barrier(12)

    def visit(client):
        start.wait()
        for _ in range(25):
            try:
                lease = client.acquire(LeaseRequest(FREE, 1.0, "large"), timeout=120)
            except QuotaExceeded:
                refused.append(1)
                continue
            granted.append(lease.id)
            client.release(lease, used=1.0)

    threads = [threading.Thread(target=visit, args=(clients[n % 2],)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(granted) == 200 and len(refused) == 100  # 300 admissions asked for, 200 s of quota
        ledger = open_ledger(postgres_url)
        try:
            balance = ledger.balance(FREE)
            assert (balance.used, balance.reserved) == (200, 0)
        finally:
            ledger.close()
    finally:
        for client in clients:
            client.close()


def test_a_killed_node_s_reservations_come_back_and_it_leaves_the_fleet(fleet, postgres_url):
    left, right = fleet
    state = fleet_state(postgres_url)
    assert [node["name"] for node in state["nodes"]] == ["left", "right"]
    assert all(len(node["devices"]) == 2 for node in state["nodes"])
    doomed, survivor = left.client(), right.client()
    try:
        doomed.acquire(LeaseRequest(FREE, 150.0, "large"), timeout=30)
        state = fleet_state(postgres_url)
        (lease,) = next(node for node in state["nodes"] if node["name"] == "left")["leases"]
        assert (lease["user"], lease["device"] is not None) == ("ada", True)
        with pytest.raises(QuotaExceeded):
            survivor.acquire(LeaseRequest(FREE, 100.0, "large"), timeout=30)
        left.stop(signal.SIGKILL)

        def admitted():
            try:
                return survivor.acquire(LeaseRequest(FREE, 100.0, "large"), timeout=30)
            except QuotaExceeded:
                return None

        lease = wait_until(admitted, timeout=60, step=0.5)  # within NODE_TIMEOUT; the bound is a hang guard
        assert lease is not None
        survivor.release(lease, used=0.0)
        assert [node["name"] for node in fleet_state(postgres_url)["nodes"]] == ["right"]
    finally:
        doomed.close()
        survivor.close()


def test_a_ledger_server_restarted_under_load_loses_no_charge(fleet, postgres_server, postgres_url):
    clients = [node.client() for node in fleet]
    released, failed = [], []
    stop = threading.Event()
    restarted = threading.Event()

    def load(client):
        while not stop.is_set():
            try:
                lease = client.acquire(LeaseRequest(PRO, 10.0, "large"), timeout=60)
            except SchedulerError:
                failed.append(1)  # admissions fail cleanly while the server is down
                continue
            client.release(lease, used=0.5)  # while down, the node keeps the charge
            released.append(1)

    threads = [threading.Thread(target=load, args=(clients[n % 2],)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(released) >= 20)
        postgres_server.stop()
        wait_until(lambda: len(failed) >= 4)
        postgres_server.start()
        restarted.set()
        count = len(released)
        wait_until(lambda: len(released) >= count + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
    assert failed, "no admission met the outage"
    ledger = open_ledger(postgres_url)
    try:
        # The charges the nodes kept are written within a renewal or two (a hang guard bounds the wait).
        wait_until(lambda: ledger.balance(PRO).used >= 0.5 * len(released), timeout=60, step=0.2)
        balance = ledger.balance(PRO)
        assert balance.used == pytest.approx(0.5 * len(released))
        assert balance.reserved == 0
    finally:
        ledger.close()


def test_fleet_status_renders_both_nodes(fleet, postgres_url):
    client = fleet[1].client()
    try:
        lease = client.acquire(LeaseRequest(PRO, 30.0, "xlarge"), timeout=30)
        done = subprocess.run([sys.executable, "-m", "zerogpu.cli", "status", "--fleet", "--ledger", postgres_url],
                              capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "160"})
        for part in ("2 nodes, 4 GPUs", "left", "right", "grace", "xlarge", "Quota today"):
            assert part in done.stdout, done.stdout
        state = fleet_state(postgres_url)
        right = next(node for node in state["nodes"] if node["name"] == "right")
        assert [d["slots"] for d in right["devices"]].count([lease.id, lease.id]) == 1
        client.release(lease, used=1.0)
    finally:
        client.close()


def test_fleet_status_of_a_ledger_that_is_down_is_a_clear_error():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "zerogpu.cli", "status", "--fleet", "--ledger",
                           f"postgresql://postgres@127.0.0.1:{port}/none"], capture_output=True, text=True)
    assert done.returncode != 0 and "cannot reach the quota ledger" in done.stdout + done.stderr
