"""The benchmarks that no other test runs, in their smallest form, so that they cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_fleet_simulation_runs_and_reports_every_tier(tmp_path):
    figures = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_scheduler.py"), "--fleet-only", "--fleet-nodes", "1",
         "--gpus-per-node", "1", "--visitors", "30", "--json", str(figures)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(figures.read_text())
    assert report["command"].startswith("bench_scheduler.py --fleet-only")
    (run,) = report["fleet"]["runs"]
    assert run["nodes"] == 1 and run["calls"] == sum(tier["calls"] for tier in run["tiers"].values()) > 0
    for tier in run["tiers"].values():
        assert tier["served"] + tier["refused_quota"] + tier["timed_out"] == tier["calls"]
    assert "utilization over the day" in done.stdout


def test_the_call_targets_run_small_and_report_every_figure_with_its_reference(tmp_path):
    figures = tmp_path / "targets.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_targets.py"), "--repeat", "2", "--model-size", "1MB",
         "--seconds", "0.2", "--tensor-bytes", "1MB", "--tensors", "10,100", "--json", str(figures)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(figures.read_text())
    calls = report["calls"]
    for name in ("cold_ms", "cold_minus_release_ms", "warm_p50_ms", "executor_p50_ms", "warm_4_threads_per_s",
                 "mp_pool_4_threads_per_s", "warm_4_threads_parent_cpu_us", "mp_pool_4_threads_parent_cpu_us"):
        figure = calls[name]
        assert 0 < figure["min"] <= figure["median"] <= figure["max"], name
    assert calls["cold_minus_release_ms"]["median"] <= calls["cold_ms"]["median"]
    assert [row["tensors"] for row in report["tensors"]] == [10, 100]
    for row in report["tensors"]:
        assert row["pack_ms"]["median"] > 0 and row["cold_ms"]["median"] > 0
    for line in ("warm p50 / ProcessPoolExecutor p50:", "4-thread throughput / multiprocessing.Pool:",
                 "100 / 10 tensors: pack"):
        assert line in done.stdout
