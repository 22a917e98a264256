"""benchmarks/gpu.sh, dry-run on the emulated backend with tiny sizes, so the GPU run cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_sh_dry_run_writes_every_figure(tmp_path):
    environ = {**os.environ, "OUT": str(tmp_path), "ZEROGPU_GPU_SH_DRY_RUN": "1", "TMPDIR": str(tmp_path),
               "ZEROGPU_DATA_DIR": str(tmp_path / "data"), "ZEROGPU_QUOTA": "anonymous=100000"}
    environ.pop("ZEROGPU_SCHEDULER", None)
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh")], env=environ, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert set(figures) >= {"restore", "pinning", "call", "bench", "seconds"}
    assert all(row["bit_exact"] in (True, None) for row in figures["restore"]["results"])
    assert figures["pinning"]["backend"] == "emulated" and figures["pinning"]["pinning"]
    assert figures["call"]["overhead"]["cold_phases_ms"]
    assert figures["bench"]["alternatives"]
    section = (tmp_path / "gpu.md").read_text()
    for heading in ("## GPU run", "| restore |", "| pinning |", "Context creation", "| cold call phase |",
                    "| zerogpu bench row |"):
        assert heading in section
