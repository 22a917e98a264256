"""Prometheus metrics: served on 127.0.0.1, scraped over HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
import torch

import zerogpu
from zerogpu.errors import InvalidArgument, QuotaExceeded
from zerogpu.identity import Identity
from zerogpu.schedule.choice import scheduler
from zerogpu.schedule.quota import this_process


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def endpoint():
    from zerogpu import metrics

    server = metrics.serve(0)
    yield server
    server.stop()


class Boom(Exception):
    pass


def test_the_counts_match_the_calls_made(gpu, monkeypatch, endpoint):
    monkeypatch.setenv("ZEROGPU_IDLE_TIMEOUT", "30")
    model = torch.nn.Linear(64, 64).to("cuda")  # noqa: F841 - restored once, then warm

    @zerogpu.GPU(duration=20)
    def double(x):
        return x * 2

    @zerogpu.GPU(duration=20)
    def fail():
        raise Boom("no")

    before = scrape(endpoint.url)
    assert endpoint.host == "127.0.0.1"
    assert double(2) == 4 and double(3) == 6  # the second one warm
    with pytest.raises(Boom):
        fail()
    # bob's quota is held by a reservation: his call is refused before it runs.
    bob = Identity("bob", "free")
    held, _ = scheduler().ledger.admit(bob, 200, "large", this_process())
    with zerogpu.identity("bob", "free"), pytest.raises(QuotaExceeded):
        double(1)
    scheduler().ledger.settle(held, None)
    during = scrape(endpoint.url)
    from zerogpu.call.warm import pool

    pool.close()
    after = scrape(endpoint.url)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return during.get(key, 0) - before.get(key, 0)

    assert grew("zerogpu_calls_total", outcome="ok") == 2
    assert grew("zerogpu_calls_total", outcome="error") == 1
    assert grew("zerogpu_calls_total", outcome="quota") == 1
    for outcome in ("crashed", "timeout", "no_gpu", "cancelled"):
        assert grew("zerogpu_calls_total", outcome=outcome) == 0
    assert grew("zerogpu_warm_calls_total") >= 1
    assert grew("zerogpu_quota_refusals_total", tier="free") == 1
    assert grew("zerogpu_call_seconds_count", phase="queue") == 3  # every call granted a GPU
    assert grew("zerogpu_call_seconds_count", phase="run") == 3
    assert grew("zerogpu_call_seconds_count", phase="restore") >= 1
    assert grew("zerogpu_restore_bytes_total") >= 64 * 64 * 4
    assert during[("zerogpu_leases_held", ())] >= 1  # the warm worker's lease
    assert during[("zerogpu_waiting_calls", ())] == 0
    busy = {labels: value for (name, labels), value in during.items()
            if name == "zerogpu_gpu_busy_slot_seconds_total"}
    assert set(busy) == {(("gpu", "0"),), (("gpu", "1"),)} and sum(busy.values()) > 0
    assert after[("zerogpu_leases_held", ())] == 0


def test_a_bad_port_is_refused():
    from zerogpu import metrics

    with pytest.raises(InvalidArgument, match="metrics port"):
        metrics.serve(70000)


def test_a_port_in_use_is_a_clear_error(endpoint):
    from zerogpu import metrics
    from zerogpu.errors import ZeroGPUError

    with pytest.raises(ZeroGPUError, match="cannot serve metrics on 127.0.0.1"):
        metrics.serve(endpoint.port)


def test_importing_zerogpu_does_not_import_prometheus_client():
    code = "import sys, zerogpu, zerogpu.call.call; print('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
