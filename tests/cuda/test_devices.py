"""Device discovery: emulated devices, CUDA_VISIBLE_DEVICES, NVML and /proc, no CUDA context."""

from __future__ import annotations

import subprocess
import sys
import types

import psutil
import pytest

from zerogpu.cuda import devices
from zerogpu.cuda.devices import PhysicalGpu
from zerogpu.errors import InvalidArgument

GPUS = [
    PhysicalGpu("GPU-aaaa1111", "NVIDIA H100 80GB HBM3", 80 * 2**30),
    PhysicalGpu("GPU-bbbb2222", "NVIDIA H100 80GB HBM3", 80 * 2**30),
    PhysicalGpu("GPU-abcd3333", "NVIDIA A100-SXM4-40GB", 40 * 2**30),
]


def fake_machine(monkeypatch, gpus: list[PhysicalGpu]) -> list[int]:
    """The driver lists `gpus` (asked afresh, not from what a test before asked); counts the askings."""
    asked = []
    monkeypatch.setattr(devices, "physical_gpus", lambda: asked.append(1) or list(gpus))
    monkeypatch.setattr(devices, "_machine", None)
    return asked


@pytest.fixture
def no_gpus(monkeypatch):
    fake_machine(monkeypatch, [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ZEROGPU_BACKEND", raising=False)


@pytest.fixture
def three_gpus(monkeypatch):
    fake_machine(monkeypatch, GPUS)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ZEROGPU_BACKEND", raising=False)


def test_emulated_devices_follow_zerogpu_emulated_gpus(no_gpus, monkeypatch):
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "4")
    found = devices.discover()
    assert [d.index for d in found] == [0, 1, 2, 3]
    assert [d.visible_id for d in found] == ["0", "1", "2", "3"]
    assert {d.backend for d in found} == {"emulated"}
    total = psutil.virtual_memory().total
    assert all(0 < d.total_memory <= total // 4 for d in found)


def test_default_backend_is_emulated_without_a_gpu(no_gpus, monkeypatch):
    monkeypatch.delenv("ZEROGPU_EMULATED_GPUS", raising=False)
    assert not devices.gpu_visible()
    found = devices.discover()
    assert len(found) == 1 and found[0].backend == "emulated"


def test_default_backend_is_cuda_when_a_gpu_is_visible(three_gpus):
    assert devices.gpu_visible()
    found = devices.discover()
    assert [(d.index, d.visible_id, d.backend) for d in found] == [
        (0, "GPU-aaaa1111", "cuda"), (1, "GPU-bbbb2222", "cuda"), (2, "GPU-abcd3333", "cuda"),
    ]
    assert found[2].name == "NVIDIA A100-SXM4-40GB" and found[2].total_memory == 40 * 2**30


def test_zerogpu_backend_overrides_the_default(three_gpus, monkeypatch):
    monkeypatch.setenv("ZEROGPU_BACKEND", "emulated")
    monkeypatch.setenv("ZEROGPU_EMULATED_GPUS", "2")
    assert [d.backend for d in devices.discover()] == ["emulated", "emulated"]
    assert [d.backend for d in devices.discover("cuda")] == ["cuda"] * 3


def test_unknown_backend_is_refused(no_gpus):
    with pytest.raises(InvalidArgument, match="'tpu' is unknown"):
        devices.discover("tpu")


@pytest.mark.parametrize("visible, expected", [
    ("2,0", ["GPU-abcd3333", "GPU-aaaa1111"]),
    ("1", ["GPU-bbbb2222"]),
    ("GPU-bbbb,0", ["GPU-bbbb2222", "GPU-aaaa1111"]),
    ("", []),
    ("-1", []),
    ("0,7,1", ["GPU-aaaa1111"]),         # CUDA stops at the first index that names no GPU
    ("0,0,1", ["GPU-aaaa1111"]),         # ... and at a GPU named twice
    ("GPU-a,1", []),                     # an ambiguous UUID prefix names no GPU
    ("1, 2", ["GPU-bbbb2222", "GPU-abcd3333"]),
])
def test_cuda_visible_devices_picks_and_orders_gpus(three_gpus, monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = devices.discover("cuda")
    assert [d.visible_id for d in found] == expected
    assert [d.index for d in found] == list(range(len(expected)))
    assert devices.gpu_visible() == bool(expected)


def test_mig_instances_are_refused_with_a_clear_error(three_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    with pytest.raises(InvalidArgument, match="MIG instance"):
        devices.discover("cuda")


def test_proc_files_are_read_in_pci_bus_order(tmp_path):
    for bus, uuid, model in [
        ("0000:c1:00.0", "GPU-second", "NVIDIA L4"),
        ("0000:41:00.0", "GPU-first", "NVIDIA H100 PCIe"),
    ]:
        folder = tmp_path / bus
        folder.mkdir()
        (folder / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nDevice Minor: \t 0\n"
        )
    (tmp_path / "0000:99:00.0").mkdir()  # no information file: skipped
    gpus = devices.proc_gpus(tmp_path)
    assert gpus == [PhysicalGpu("GPU-first", "NVIDIA H100 PCIe", 0), PhysicalGpu("GPU-second", "NVIDIA L4", 0)]


def test_proc_files_absent_mean_no_gpu(tmp_path):
    assert devices.proc_gpus(tmp_path / "missing") == []


def fake_nvml(gpus: list[PhysicalGpu], *, fails: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls = []

    class NVMLError(Exception):
        pass

    def init():
        calls.append("init")
        if fails:
            raise NVMLError("NVML Shared Library Not Found")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(gpus)
    module.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    module.nvmlDeviceGetUUID = lambda h: h.uuid.encode()   # old releases return bytes
    module.nvmlDeviceGetName = lambda h: h.name
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h.total_memory, free=0, used=0)
    module.calls = calls
    return module


def test_nvml_is_asked_first_and_shut_down(monkeypatch):
    module = fake_nvml(GPUS[:2])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert devices.physical_gpus() == GPUS[:2]
    assert module.calls == ["init", "shutdown"]


def test_proc_files_are_the_fallback_when_nvml_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS, fails=True))
    monkeypatch.setattr(devices, "proc_gpus", lambda: GPUS[2:])
    assert devices.physical_gpus() == GPUS[2:]


@pytest.mark.slow
def test_discovery_creates_no_cuda_context():
    script = (
        "import sys\n"
        "from zerogpu.cuda import devices\n"
        "devices.gpu_visible(); devices.discover(); devices.discover('cuda')\n"
        "assert 'libcuda' not in open('/proc/self/maps').read(), 'libcuda was loaded'\n"
        "torch = sys.modules.get('torch')\n"
        "assert torch is None or not torch.cuda.is_initialized(), 'torch initialized CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_driver_is_asked_once_and_the_environment_every_time(monkeypatch):
    asked = fake_machine(monkeypatch, GPUS)
    monkeypatch.delenv("ZEROGPU_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.gpu_visible() and len(devices.discover()) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert [d.visible_id for d in devices.discover("cuda")] == ["GPU-abcd3333"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not devices.gpu_visible() and devices.discover()[0].backend == "emulated"
    assert len(asked) == 1
    devices.forget()
    devices.discover("cuda")
    assert len(asked) == 2


def test_enable_and_the_first_call_ask_the_driver_once(monkeypatch, tmp_path):
    import zerogpu
    from zerogpu import runtime
    from conftest import emulated_environment

    emulated_environment(monkeypatch, tmp_path)
    monkeypatch.delenv("ZEROGPU_BACKEND")  # chosen from what the driver says: no GPU, so emulated
    asked = fake_machine(monkeypatch, [])
    zerogpu.enable()
    try:
        @zerogpu.GPU(duration=20)
        def double(x):
            return 2 * x

        assert double(21) == 42
        assert runtime.backend() == "emulated"
    finally:
        runtime.disable()
    assert len(asked) == 1
