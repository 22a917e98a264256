"""The torch features public Spaces use, on the emulated device: as plain PyTorch gives them on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import emulated_environment
from zerogpu.errors import CudaInitialized

APPS = Path(__file__).resolve().parent / "apps"


def zerogpu_command() -> list[str]:
    script = Path(sys.executable).with_name("zerogpu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "zerogpu.cli"]


@pytest.fixture
def environ(tmp_path, monkeypatch):
    emulated_environment(monkeypatch, tmp_path)
    return dict(os.environ)


def run(command: list[str], environ: dict, cwd: Path) -> dict:
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_space_patterns_under_zerogpu_run_give_the_plain_cpu_results(environ, tmp_path):
    """device_map="auto" and enable_model_cpu_offload at import, 'cuda' generators, autocast, GPU(queue=...)."""
    app = str(APPS / "torch_features_app.py")
    plain_environ = {**environ, "PYTHONPATH": os.pathsep.join([str(APPS / "stub_spaces"), environ.get("PYTHONPATH", "")])}
    plain = run([sys.executable, app, "7"], plain_environ, tmp_path)
    emulated = run([*zerogpu_command(), "run", app, "7"], environ, tmp_path)
    assert [call["device"] for call in plain] == ["cpu", "cpu"]
    assert [call["device"] for call in emulated] == ["cuda", "cuda"]
    for on_cpu, on_zerogpu in zip(plain, emulated):
        for key in ("logits", "image", "noise"):
            assert on_zerogpu[key] == pytest.approx(on_cpu[key], abs=1e-6), key
        assert on_zerogpu["autocast"][0] == on_cpu["autocast"][0] == "torch.bfloat16"
        assert on_zerogpu["autocast"][1] == pytest.approx(on_cpu["autocast"][1], rel=1e-3)
    assert emulated[0] == emulated[1]  # seeded alike, call after call


def test_a_seeded_cuda_generator_gives_the_same_numbers_call_after_call(gpu):
    @gpu.GPU
    def draw(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        assert generator.device == torch.device("cuda", 0) and isinstance(generator, torch.Generator)
        values = torch.randn(5, generator=generator, device="cuda")
        assert values.device.type == "cuda"
        return values.cpu()

    first, second = draw(3), draw(3)
    assert torch.equal(first, second)
    assert torch.equal(first, torch.randn(5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, draw(4))
    generator = torch.Generator(device="cuda").manual_seed(3)  # in the parent too, at import
    assert torch.equal(torch.randn(5, generator=generator, device="cuda").cpu(), first)


def test_autocast_on_cuda_casts_as_cpu_autocast_does(gpu):
    @gpu.GPU
    def multiply():
        a, b = torch.randn(4, 4, device="cuda"), torch.randn(4, 4, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = a @ b
        with pytest.warns(FutureWarning):
            legacy = torch.cuda.amp.autocast()
        with legacy:
            fp16 = a @ b
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = a.cpu() @ b.cpu()
        return bf16.dtype, fp16.dtype, torch.equal(bf16.cpu(), reference), bf16.device.type

    assert multiply() == (torch.bfloat16, torch.float16, True, "cuda")


def test_memory_queries_report_what_the_emulated_device_holds(gpu):
    @gpu.GPU
    def measure():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        big = torch.empty(2**20, device="cuda")  # 4 MiB
        view = big[: 2**10]  # the same storage, counted once
        held = torch.cuda.memory_allocated() - base
        del big, view
        after = torch.cuda.memory_allocated() - base
        peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        reset = torch.cuda.max_memory_allocated() - base
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        return held, after, peak, reset, total - free == torch.cuda.memory_allocated(), stats["allocated_bytes.all.peak"]

    held, after, peak, reset, consistent, stats_peak = measure()
    assert held == 4 * 2**20 and after == 0 and peak == 4 * 2**20 and reset == 0 and consistent
    assert stats_peak >= 0


def test_weights_count_in_the_memory_of_the_worker(gpu):
    weights = torch.nn.Linear(512, 512).to("cuda")  # 1 MiB and 2 KiB, restored in the worker

    @gpu.GPU
    def allocated():
        return torch.cuda.memory_allocated(), weights.weight.device.type

    held, device = allocated()
    assert device == "cuda" and held >= 512 * 512 * 4


def test_streams_and_events_run_in_order_and_time_real_work(gpu):
    @gpu.GPU
    def timed():
        stream = torch.cuda.Stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            assert torch.cuda.current_stream() == stream
            start.record()
            x = torch.randn(64, 64, device="cuda")
            y = x @ x
            y.record_stream(stream)
            end.record()
        assert torch.cuda.current_stream() == torch.cuda.default_stream() != stream
        stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.current_stream().wait_event(end)
        end.synchronize()
        torch.cuda.synchronize()
        untimed = torch.cuda.Event()
        untimed.record()
        with pytest.raises(RuntimeError, match="enable_timing=True"):
            untimed.elapsed_time(end)
        return start.elapsed_time(end) >= 0, stream.query(), end.query(), y.device.type

    assert timed() == (True, True, True, "cuda")


def test_untyped_storage_on_cuda(gpu):
    @gpu.GPU
    def storage():
        base = torch.cuda.memory_allocated()
        made = torch.UntypedStorage(1024, device="cuda")
        counted = torch.cuda.memory_allocated() - base
        return made.device.type, made.is_cuda, made.nbytes(), counted, torch.UntypedStorage(8).device.type

    assert storage() == ("cuda", True, 1024, 1024, "cpu")


def test_accelerator_and_bare_ordinals_name_the_emulated_device(gpu):
    assert torch.accelerator.is_available() and torch.accelerator.current_accelerator() == torch.device("cuda")
    count = torch.cuda.device_count()
    assert torch.accelerator.device_count() == count
    assert torch.device(count - 1) == torch.device("cuda", count - 1)
    with pytest.raises(RuntimeError, match=f"invalid device ordinal: cuda:{count}"):
        torch.device(count)
    assert torch.cuda.get_rng_state().dtype == torch.uint8  # what torch.compile asks first

    @gpu.GPU
    def worker():
        return torch.device(0), torch.accelerator.current_device_index(), torch.accelerator.memory_allocated()

    device, index, allocated = worker()
    assert device == torch.device("cuda", 0) and index == 0 and allocated >= 0


def test_calls_that_cannot_be_emulated_name_the_call_and_blame_no_thread(gpu):
    with pytest.raises(CudaInitialized) as raised:
        torch.cuda.ipc_collect()
    message = str(raised.value)
    assert "torch.cuda.ipc_collect()" in message and "@zerogpu.GPU" in message
    assert "thread" not in message


def test_unpatched_torch_is_plain_torch():
    from zerogpu.cuda import emulation

    originals = (torch.Generator, torch.compile, torch.export.export, torch.accelerator.is_available,
                 torch.cuda.Stream, torch.cuda.memory_allocated, torch.amp.autocast_mode.autocast.__init__)
    emulation.patch()
    try:
        assert torch.Generator is not originals[0] and torch.accelerator.is_available()
    finally:
        emulation.unpatch()
    assert (torch.Generator, torch.compile, torch.export.export, torch.accelerator.is_available,
            torch.cuda.Stream, torch.cuda.memory_allocated, torch.amp.autocast_mode.autocast.__init__) == originals
    assert "__new__" not in vars(torch.UntypedStorage) and "device" not in vars(torch.UntypedStorage)
    assert "record_stream" not in vars(torch.Tensor)


@pytest.fixture
def own_compile_cache(monkeypatch):
    """Inductor's cache folder left for zerogpu to choose (torch writes its choice into the environment)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.mark.slow
def test_torch_compile_in_a_worker_is_paid_once_for_every_later_cold_worker(own_compile_cache, gpu, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to("cuda")
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x.to("cuda")).cpu()

    @gpu.GPU(duration=600)
    def compiled_call(x):
        from torch._dynamo.utils import counters

        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x.to("cuda"))
        assert out.device.type == "cuda"
        inductor = counters["inductor"]
        return out.cpu(), inductor["fxgraph_cache_miss"], inductor["fxgraph_cache_hit"], os.environ["TORCHINDUCTOR_CACHE_DIR"]

    first, misses, hits, folder = compiled_call(x)
    assert torch.allclose(first, expected, atol=1e-5) and (misses, hits) == (1, 0)
    assert folder.startswith(str(tmp_path / "data" / "compile-cache"))
    second, misses, hits, _ = compiled_call(x)  # a new cold worker: the compile comes from the app's cache
    assert torch.equal(second, first) and (misses, hits) == (0, 1)
    assert os.stat(folder).st_mode & 0o077 == 0
