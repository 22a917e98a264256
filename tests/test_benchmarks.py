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
