"""Calls made with no visitor's identity run on the app's own account, which has no daily quota by default."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import zerogpu
from zerogpu.errors import InvalidArgument
from zerogpu.identity import Identity, identify_visitors
from zerogpu.schedule.policy import Policy
from zerogpu.schedule.quota_sqlite import SQLiteLedger
from zerogpu.schedule.choice import reset_scheduler, scheduler

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def published(gpu, monkeypatch):
    """ZeroGPU's own quotas (the shared fixture raises them), in a scheduler made afresh."""
    monkeypatch.delenv("ZEROGPU_QUOTA")
    monkeypatch.setenv("ZEROGPU_APP", "the-app")
    reset_scheduler()
    return gpu


def test_six_concurrent_xlarge_calls_on_two_gpus_all_run_for_the_app(published):
    @zerogpu.GPU(duration=20, size="xlarge")
    def whole_gpu(i: int) -> int:
        return i

    results, errors = [], []

    def call(i: int) -> None:
        try:
            results.append(whole_gpu(i))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]  # 240 s of quota asked at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and sorted(results) == list(range(6))
    [balance] = scheduler().ledger.balances()
    assert balance.identity == Identity("the-app", "app") and balance.describe()["limit"] is None


@pytest.mark.parametrize("duration", [120, 180, 200, 300])
def test_the_durations_real_spaces_ask_for_run_for_the_app(published, duration):
    @zerogpu.GPU(duration=duration)
    def long_one() -> str:
        return "ran"

    assert long_one() == "ran" and long_one() == "ran"


def test_a_quota_set_for_the_app_limits_it_and_says_so(published, monkeypatch):
    monkeypatch.setenv("ZEROGPU_QUOTA", "app=100")
    reset_scheduler()

    @zerogpu.GPU(duration=120)
    def too_long() -> None:
        return None

    with pytest.raises(InvalidArgument, match="ZEROGPU_QUOTA=app=SECONDS"):
        too_long()


def test_a_visitor_tier_keeps_zerogpus_quota(published):
    @zerogpu.GPU(duration=200)
    def long_one() -> None:
        return None

    with zerogpu.identity("someone", tier="anonymous"):
        with pytest.raises(InvalidArgument, match="anonymous tier's maximum of 120 s"):
            long_one()
    with zerogpu.identity("someone", tier="free"):
        long_one()


def test_identify_visitors_takes_a_function_or_none():
    with pytest.raises(InvalidArgument, match="function of the request"):
        identify_visitors("not a function")
    assert identify_visitors(None) is None


def test_the_quickstart_runs_again_and_again_on_the_apps_account(tmp_path):
    environ = {**os.environ, "ZEROGPU_BACKEND": "emulated", "ZEROGPU_DATA_DIR": str(tmp_path)}
    for name in ("ZEROGPU_QUOTA", "ZEROGPU_APP", "ZEROGPU_SCHEDULER"):
        environ.pop(name, None)
    script = str(EXAMPLES / "quickstart.py")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "zerogpu.cli", "run", script], env=environ,
                              capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "same as on the CPU: True" in done.stdout
    ledger = SQLiteLedger(tmp_path / "quota.sqlite3", Policy())
    try:
        accounts = {b.identity for b in ledger.balances()}
    finally:
        ledger.close()
    assert accounts == {Identity(script, "app"), Identity("alice", "pro")}  # named after the script
