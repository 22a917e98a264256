"""zerogpu.aot and spaces' aoti_* helpers: compiled in a worker, the package without its weights, loaded from disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zerogpu.aot
from conftest import emulated_environment
from zerogpu.errors import InvalidArgument

APP = Path(__file__).resolve().parent / "apps" / "aot_app.py"


def zerogpu_command() -> list[str]:
    script = Path(sys.executable).with_name("zerogpu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "zerogpu.cli"]


def test_bad_input_is_refused_before_a_worker_starts(tmp_path):
    with pytest.raises(InvalidArgument, match="takes a torch.nn.Module, not function"):
        zerogpu.aot.compile(lambda x: x, (torch.ones(1),))
    with pytest.raises(InvalidArgument, match="example_args must be a tuple"):
        zerogpu.aot.compile(torch.nn.Linear(2, 2), torch.ones(1, 2))
    with pytest.raises(InvalidArgument, match="non-empty bytes of a .pt2 archive"):
        zerogpu.aot.Compiled(b"")
    with pytest.raises(InvalidArgument, match="what zerogpu.aot.compile returned"):
        zerogpu.aot.apply(b"bytes", torch.nn.Linear(2, 2))
    with pytest.raises(InvalidArgument, match="no compiled package at .*compile it and save it there first"):
        zerogpu.aot.load(torch.nn.Linear(2, 2), tmp_path / "missing")


def test_a_saved_package_is_the_owners_and_reads_back_as_it_was(tmp_path):
    compiled = zerogpu.aot.Compiled(b"an archive")
    path = zerogpu.aot.save(compiled, tmp_path / "folder")
    assert path == tmp_path / "folder" / "package.pt2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert zerogpu.aot.read(path.parent).archive == b"an archive" == zerogpu.aot.read(path).archive
    assert not list(path.parent.glob("*.partial"))


@pytest.mark.slow
def test_native_compile_in_a_worker_then_apply_and_call(gpu, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to("cuda")
    x = torch.randn(4, 16, device="cuda")

    @gpu.GPU
    def call():
        with torch.no_grad():
            out = model(x)
        return out.device.type, out.cpu()

    _, eager = call()
    compiled = zerogpu.aot.compile(model, (x,))
    assert isinstance(compiled, zerogpu.aot.Compiled)
    zerogpu.aot.apply(compiled, model)
    device, out = call()
    assert device == "cuda" and torch.allclose(out, eager, atol=1e-4)
    zerogpu.aot.save(compiled, tmp_path / "model")
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to("cuda")
    fresh.load_state_dict(model.state_dict())
    zerogpu.aot.load(fresh, tmp_path / "model")

    @gpu.GPU
    def call_fresh():
        with torch.no_grad():
            return fresh(x).cpu()

    assert torch.allclose(call_fresh(), eager, atol=1e-4)


@pytest.mark.slow
def test_the_guide_snippet_compiles_once_and_a_second_run_loads_the_package_from_disk(tmp_path, monkeypatch):
    emulated_environment(monkeypatch, tmp_path)
    package = tmp_path / "package"
    results = []
    for _ in range(2):
        done = subprocess.run([*zerogpu_command(), "run", str(APP), str(package)], env=dict(os.environ),
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.splitlines()[-1]))
    first, second = results
    assert first["compiled"] and not second["compiled"]  # the second run loaded the package from disk
    for result in results:
        assert result["bound"] == "Bound" and result["difference"] < 1e-4
    # The package came back without the weights: the parent holds them once, in the snapshot.
    assert first["rss_growth"] < first["weights"] / 2
