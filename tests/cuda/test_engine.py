"""The copy engine: restores through every strategy, the emulated driver's
semantics, injected faults, the driver loader and the torch integration."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerogpu.cuda import engine as zengine
from zerogpu.cuda._ext import _engine
from zerogpu.cuda.engine import STRATEGIES, EmulatedFaults, Engine, restore_snapshot
from zerogpu.errors import CudaError, CudaUnavailable, InvalidArgument
from zerogpu.snapshot.snapshot import Snapshot

KiB = 1 << 10
MiB = 1 << 20
NOTHING_LIVE = {
    "allocations": 0,
    "host_allocations": 0,
    "locked_bytes": 0,
    "registrations": 0,
    "streams": 0,
    "events": 0,
    "stream_threads": 0,
    "allocated_bytes": 0,
    "workers": 0,
}
# Where each strategy reports a failed copy: synchronous copies at once,
# asynchronous ones at the next synchronization.
FAILED_COPY_CALLS = {
    "pageable": {"cuMemcpyHtoD_v2"},
    "register": {"cuEventSynchronize", "cuStreamSynchronize"},
    "staging": {"cuEventSynchronize", "cuStreamSynchronize"},
}


@pytest.fixture(autouse=True)
def no_faults():
    zengine.set_emulated_faults(None)
    yield
    zengine.set_emulated_faults(None)


@pytest.fixture
def engine():
    with Engine("emulated") as opened:
        yield opened
    assert zengine.emulated_resources() == NOTHING_LIVE


def random_bytes(nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def live() -> dict[str, int]:
    return zengine.emulated_resources()


class FakeSnapshot:
    """Named tensors laid out by hand in one host buffer, each with its own strides."""

    ALIGN = 64

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = {}
        offset = 0
        for name, tensor in tensors.items():
            offset = -(-offset // self.ALIGN) * self.ALIGN
            span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
            nbytes = span * tensor.element_size() if tensor.numel() else 0
            self.layout[name] = (offset, nbytes, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            offset += nbytes
        self.nbytes = offset
        self.host = torch.zeros(self.nbytes, dtype=torch.uint8)
        self.address = self.host.data_ptr()
        for name, view in self.views(self.host).items():
            view.copy_(tensors[name])

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: buffer[offset : offset + nbytes].view(dtype).as_strided(shape, stride)
            for name, (offset, nbytes, dtype, shape, stride) in self.layout.items()
        }


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "weight": torch.randn(33, 17, generator=generator),
        "weight_t": torch.randn(5, 9, generator=generator).t(),  # strides (1, 9)
        "half": torch.randn(11, generator=generator).to(torch.bfloat16),
        "fp16": torch.randn(3, 4, 5, generator=generator).half().permute(2, 0, 1),
        "ids": torch.randint(-(2**40), 2**40, (13,), generator=generator),
        "mask": torch.rand(7, generator=generator) > 0.5,
        "scale": torch.tensor(3.25, dtype=torch.float64),
        "small": torch.arange(6, dtype=torch.int8).reshape(2, 3),
    }


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "chunk_bytes, streams, threads",
    [(64 * KiB, 1, 1), (64 * KiB, 2, 2), (100_003, 3, 2), (4 * MiB, 1, 3), (4096, 2, 4)],
)
def test_restore_round_trips_every_strategy(engine, strategy, chunk_bytes, streams, threads):
    src = random_bytes(3 * MiB + 4321)
    dst = np.zeros_like(src)
    stats = engine.restore(src, dst, strategy=strategy, chunk_bytes=chunk_bytes, streams=streams, threads=threads)
    assert np.array_equal(dst, src)
    assert (stats.strategy, stats.nbytes, stats.chunk_bytes, stats.streams, stats.threads) == (
        strategy,
        src.nbytes,
        chunk_bytes,
        streams,
        threads,
    )
    assert stats.seconds > 0 and stats.gbps > 0
    assert (stats.register_seconds > 0) == (strategy == "register")
    assert live()["registrations"] == live()["events"] == live()["workers"] == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    strategy=st.sampled_from(STRATEGIES),
    nbytes=st.integers(1, 3 * MiB),
    src_offset=st.integers(0, 5000),
    dst_offset=st.integers(0, 5000),
    chunk_bytes=st.sampled_from([1, 777, 4096, 65_537, MiB]),
    streams=st.integers(1, 3),
    threads=st.integers(1, 3),
)
def test_restore_copies_exactly_the_region(strategy, nbytes, src_offset, dst_offset, chunk_bytes, streams, threads):
    # Chunk sizes that do not divide the region, and regions that start and
    # end off page boundaries (which "register" rounds out to whole pages).
    if chunk_bytes == 1:
        nbytes = min(nbytes, 20_000)  # one copy per byte: keep it short
    src = random_bytes(src_offset + nbytes + 100, seed=nbytes)
    dst = np.zeros(dst_offset + nbytes + 100, dtype=np.uint8)
    with Engine("emulated") as engine:
        engine.restore(
            src.ctypes.data + src_offset,
            dst.ctypes.data + dst_offset,
            nbytes,
            strategy=strategy,
            chunk_bytes=chunk_bytes,
            streams=streams,
            threads=threads,
        )
    assert np.array_equal(dst[dst_offset : dst_offset + nbytes], src[src_offset : src_offset + nbytes])
    assert not dst[:dst_offset].any() and not dst[dst_offset + nbytes :].any()
    assert live() == NOTHING_LIVE


def test_engine_keeps_its_streams_and_ring_between_restores(engine):
    src = random_bytes(MiB)
    dst = np.zeros_like(src)
    first = engine.restore(src, dst, strategy="staging", chunk_bytes=64 * KiB, streams=2, threads=2)
    again = engine.restore(src, dst, strategy="staging", chunk_bytes=64 * KiB, streams=2, threads=2)
    assert first.setup_seconds > 0 and again.setup_seconds == 0
    assert live()["streams"] == live()["stream_threads"] == 2
    assert live()["host_allocations"] == 1


# --- the emulated driver's semantics -------------------------------------------------------


@pytest.fixture
def device():
    device = _engine.Device(_engine.Driver.load("emulated"), 0)
    yield device
    del device
    assert live() == NOTHING_LIVE


def test_async_copies_are_asynchronous_and_ordered_per_stream(device):
    first, second = random_bytes(8 * KiB, seed=1), random_bytes(8 * KiB, seed=2)
    dst = np.zeros_like(first)
    stream, event = device.stream_create(), device.event_create()
    try:
        zengine.set_emulated_faults(EmulatedFaults(hang_after_bytes=0))  # the first copy stalls
        device.memcpy_htod_async(dst.ctypes.data, first.ctypes.data, first.nbytes, stream)
        device.memcpy_htod_async(dst.ctypes.data, second.ctypes.data, second.nbytes, stream)
        device.event_record(event, stream)
        time.sleep(0.2)
        assert device.event_query(event) is False  # queued calls returned, the copies have not run
        assert not dst.any()
        zengine.set_emulated_faults(None)
        device.event_synchronize(event)
        assert device.event_query(event) is True
        assert np.array_equal(dst, second)  # the second copy ran after the first
    finally:
        device.event_destroy(event)
        device.stream_destroy(stream)


def test_async_error_is_reported_at_the_next_synchronization(device):
    src = random_bytes(1000)
    dst = np.zeros_like(src)
    stream, before, after = device.stream_create(), device.event_create(), device.event_create()
    try:
        device.event_record(before, stream)
        zengine.set_emulated_faults(EmulatedFaults(fail_after_bytes=100))
        device.memcpy_htod_async(dst.ctypes.data, src.ctypes.data, src.nbytes, stream)  # does not raise
        device.event_record(after, stream)
        device.event_synchronize(before)  # before the failed copy: fine
        with pytest.raises(CudaError) as at_event:
            device.event_synchronize(after)
        assert (at_event.value.call, at_event.value.name) == ("cuEventSynchronize", "CUDA_ERROR_ILLEGAL_ADDRESS")
        with pytest.raises(CudaError) as at_stream:
            device.stream_synchronize(stream)
        error = at_stream.value
        assert (error.call, error.code, error.name) == ("cuStreamSynchronize", 700, "CUDA_ERROR_ILLEGAL_ADDRESS")
        assert str(error) == (
            "cuStreamSynchronize failed: CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)"
        )
        device.stream_synchronize(stream)  # reported once
        assert np.array_equal(dst[:100], src[:100]) and not dst[100:].any()
    finally:
        device.event_destroy(before)
        device.event_destroy(after)
        device.stream_destroy(stream)


def test_synchronous_copy_fails_in_the_call(device):
    src = random_bytes(1000)
    dst = np.zeros_like(src)
    zengine.set_emulated_faults("fail_after_bytes=10")
    with pytest.raises(CudaError) as failed:
        device.memcpy_htod(dst.ctypes.data, src.ctypes.data, src.nbytes)
    assert failed.value.call == "cuMemcpyHtoD_v2"


def test_overlapping_registrations_are_refused(device):
    host = np.zeros(4 * 4096, dtype=np.uint8)
    base = host.ctypes.data
    device.host_register(base, 8192)
    try:
        with pytest.raises(CudaError) as overlap:
            device.host_register(base + 4096, 8192)
        assert overlap.value.name == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"
        with pytest.raises(CudaError) as unknown:
            device.host_unregister(base + 4096)
        assert unknown.value.name == "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"
    finally:
        device.host_unregister(base)


def test_device_memory_is_accounted(device):
    memory = device.alloc(10 * MiB)
    tensor = device.alloc_tensor(MiB)
    assert live()["allocations"] == 2 and live()["allocated_bytes"] == 11 * MiB
    assert tensor.dtype == torch.uint8 and tensor.shape == (MiB,) and tensor.device.type == "cpu"
    memory.free()
    memory.free()  # a second free does nothing
    del tensor
    assert live()["allocations"] == 0


def test_memory_already_registered_elsewhere_is_copied_and_left_registered(device):
    src = random_bytes(16 * 4096)
    dst = np.zeros_like(src)
    page = -(-src.ctypes.data // 4096) * 4096
    device.host_register(page + 4096, 2 * 4096)  # someone else locked part of the source
    try:
        with Engine("emulated") as engine:
            engine.restore(src, dst, strategy="register", chunk_bytes=4096)
        assert np.array_equal(dst, src)
        assert live()["registrations"] == 1  # theirs, still there
    finally:
        device.host_unregister(page + 4096)


# --- faults through a restore --------------------------------------------------------------

CHUNK = 64 * KiB
REGION = 5 * CHUNK + 123


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("good_bytes", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 5, REGION - 1])
def test_failed_copy_surfaces_and_leaves_nothing(strategy, good_bytes):
    src = random_bytes(REGION)
    dst = np.zeros_like(src)
    with Engine("emulated") as engine:
        zengine.set_emulated_faults(EmulatedFaults(fail_after_bytes=good_bytes))
        with pytest.raises(CudaError) as failed:
            engine.restore(src, dst, strategy=strategy, chunk_bytes=CHUNK, streams=2, threads=2)
        assert failed.value.call in FAILED_COPY_CALLS[strategy]
        assert failed.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
        assert str(failed.value).startswith(f"{failed.value.call} failed: CUDA_ERROR_ILLEGAL_ADDRESS")
        assert (live()["registrations"], live()["events"], live()["workers"]) == (0, 0, 0)
        # The emulated errors are not sticky: once the fault is gone the engine works.
        zengine.set_emulated_faults(None)
        engine.restore(src, dst, strategy=strategy, chunk_bytes=CHUNK, streams=2, threads=2)
        assert np.array_equal(dst, src)
    assert live() == NOTHING_LIVE


def test_copy_within_the_byte_budget_succeeds(engine):
    src = random_bytes(REGION)
    dst = np.zeros_like(src)
    zengine.set_emulated_faults(EmulatedFaults(fail_after_bytes=REGION))
    engine.restore(src, dst, strategy="register", chunk_bytes=CHUNK)
    assert np.array_equal(dst, src)


@pytest.mark.parametrize("good_registrations", [0, 1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_failed_registration_surfaces_and_unregisters_the_rest(good_registrations, threads):
    src = random_bytes(8 * CHUNK)
    dst = np.zeros_like(src)
    with Engine("emulated") as engine:
        zengine.set_emulated_faults(EmulatedFaults(fail_register=good_registrations))
        with pytest.raises(CudaError) as failed:
            engine.restore(src, dst, strategy="register", chunk_bytes=CHUNK, streams=2, threads=threads)
        assert (failed.value.call, failed.value.name) == ("cuMemHostRegister_v2", "CUDA_ERROR_OUT_OF_MEMORY")
        assert (live()["registrations"], live()["events"], live()["workers"]) == (0, 0, 0)
    assert live() == NOTHING_LIVE


def test_failed_allocation_surfaces_for_the_ring_and_the_buffer():
    src = random_bytes(MiB)
    dst = np.zeros_like(src)
    with Engine("emulated") as engine:
        zengine.set_emulated_faults("fail_alloc")
        with pytest.raises(CudaError) as ring:
            engine.restore(src, dst, strategy="staging", chunk_bytes=CHUNK, threads=2)
        assert (ring.value.call, ring.value.name) == ("cuMemHostAlloc", "CUDA_ERROR_OUT_OF_MEMORY")
        with pytest.raises(CudaError) as buffer:
            restore_snapshot(FakeSnapshot(sample_tensors()), engine=engine)
        assert buffer.value.call == "cuMemAlloc_v2"
        assert live()["allocations"] == live()["host_allocations"] == 0
        zengine.set_emulated_faults(EmulatedFaults(fail_alloc=1))  # the ring, then nothing
        engine.restore(src, dst, strategy="staging", chunk_bytes=CHUNK, threads=2)
        with pytest.raises(CudaError):
            engine.alloc(MiB)
    assert live() == NOTHING_LIVE


def test_hang_stalls_a_restore_until_the_fault_is_cleared(engine):
    src = random_bytes(MiB)
    dst = np.zeros_like(src)
    zengine.set_emulated_faults(EmulatedFaults(hang_after_bytes=300 * KiB))
    outcome: list[object] = []
    restoring = threading.Thread(
        target=lambda: outcome.append(engine.restore(src, dst, strategy="register", chunk_bytes=CHUNK, streams=2))
    )
    restoring.start()
    # While the restore waits in C++, this thread runs Python: the GIL is released.
    deadline = time.monotonic() + 0.5
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    assert restoring.is_alive() and spins > 1000
    zengine.set_emulated_faults(None)
    restoring.join(timeout=10)
    assert not restoring.is_alive() and len(outcome) == 1
    assert np.array_equal(dst, src)


def run_in_child(body: Callable[[Callable[[str], None]], None]) -> tuple[int, int]:
    """Fork a child that runs body(say); returns its pid and the read end of its messages."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        status = 0
        try:
            body(lambda message: os.write(write_end, message.encode() + b"\n"))
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            os.write(write_end, f"raised {type(exc).__name__}: {exc}\n".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def read_messages(read_end: int, timeout: float, *, until: str | None = None) -> list[str]:
    """The child's messages within `timeout` seconds, or until it says `until`."""
    heard: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and until not in heard:
        ready, _, _ = select.select([read_end], [], [], left)
        if not ready:
            break
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        heard += [line.decode() for line in lines]
    return heard


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hang_from_the_environment_keeps_a_child_in_restore_until_killed(monkeypatch, strategy):
    monkeypatch.setenv("ZEROGPU_EMULATED_FAULTS", "hang_after_bytes=4096")

    def child(say):
        src = random_bytes(MiB)
        dst = np.zeros_like(src)
        engine = Engine("emulated")  # picks the fault up from the environment
        say("restoring")
        engine.restore(src, dst, strategy=strategy, chunk_bytes=CHUNK, streams=2, threads=2)
        say("returned")

    pid, messages = run_in_child(child)
    try:
        assert read_messages(messages, timeout=60, until="restoring") == ["restoring"]
        assert read_messages(messages, timeout=1.0) == [], "the restore should not end"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child should still be restoring"
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(messages)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_forked_child_refuses_the_parents_engine_and_makes_its_own(engine):
    def child(say):
        try:
            engine.restore(random_bytes(100), np.zeros(100, dtype=np.uint8))
        except InvalidArgument as exc:
            say("refused" if "forked child" in str(exc) else "wrong-message")
        src = random_bytes(MiB)
        dst = np.zeros_like(src)
        with Engine("emulated") as own:
            own.restore(src, dst, strategy="staging", chunk_bytes=CHUNK, streams=2, threads=2)
        say("restored" if np.array_equal(src, dst) else "corrupt")
        say("clean" if zengine.emulated_resources() == NOTHING_LIVE else "leaked")

    pid, messages = run_in_child(child)
    heard = read_messages(messages, timeout=60, until="clean")
    _, status = os.waitpid(pid, 0)
    os.close(messages)
    assert heard == ["refused", "restored", "clean"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_faults_are_parsed_from_text():
    text = "fail_after_bytes=1048576,fail_alloc,fail_register,hang_after_bytes=0"
    assert EmulatedFaults.parse(text) == EmulatedFaults(
        fail_after_bytes=1048576, hang_after_bytes=0, fail_alloc=0, fail_register=0
    )
    assert EmulatedFaults.parse(" fail_register = 2 , ") == EmulatedFaults(fail_register=2)
    assert EmulatedFaults.parse("") == EmulatedFaults()
    for bad in ("fail_everything", "fail_alloc=-1", "hang_after_bytes=lots"):
        with pytest.raises(InvalidArgument, match="emulated fault"):
            EmulatedFaults.parse(bad)


def test_faults_from_the_environment_apply_when_an_engine_is_created(monkeypatch):
    monkeypatch.setenv("ZEROGPU_EMULATED_FAULTS", "fail_alloc=1,fail_register=2")
    with Engine("emulated") as engine:
        assert _engine.emulated_faults() == {
            "fail_after_bytes": -1,
            "hang_after_bytes": -1,
            "fail_alloc": 1,
            "fail_register": 2,
        }
        kept = engine.alloc(4096)
        with pytest.raises(CudaError, match="cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY"):
            engine.alloc(4096)
        kept.free()


# --- the loader ----------------------------------------------------------------------------


def test_missing_driver_library_is_reported_clearly():
    missing = "/nonexistent/libcuda.so.1"
    with pytest.raises(CudaUnavailable) as unavailable:
        Engine("cuda", library=missing)
    message = str(unavailable.value)
    assert unavailable.value.call == "dlopen"
    assert missing in message and "No such file" in message
    assert "ZEROGPU_BACKEND=emulated" in message
    info = zengine.driver_info(missing)
    assert info["found"] is False and missing in info["error"]


def test_library_lacking_the_driver_functions_is_reported():
    with pytest.raises(CudaUnavailable) as unavailable:
        Engine("cuda", library="libm.so.6")
    assert unavailable.value.call == "dlsym"
    assert "cuMemcpyHtoDAsync_v2" in str(unavailable.value)


def test_emulated_backend_is_loaded_through_the_same_loader():
    driver = _engine.Driver.load("emulated")
    assert driver.backend == "emulated"
    assert os.path.samefile(driver.path, _engine.__file__)
    assert driver.version == 12000


# --- torch ---------------------------------------------------------------------------------


def test_restore_snapshot_rebuilds_every_tensor(engine):
    tensors = sample_tensors()
    snapshot = FakeSnapshot(tensors)
    buffer, views, stats = restore_snapshot(snapshot, "cpu", engine=engine, chunk_bytes=4096, threads=2)
    assert buffer.dtype == torch.uint8 and buffer.numel() == snapshot.nbytes
    assert stats.nbytes == snapshot.nbytes and stats.strategy == zengine.DEFAULT_STRATEGY["emulated"]
    assert buffer.data_ptr() != snapshot.address
    assert views.keys() == tensors.keys()
    for name, original in tensors.items():
        restored = views[name]
        assert restored.dtype == original.dtype, name
        assert restored.shape == original.shape, name
        assert restored.stride() == original.stride(), name
        assert torch.equal(restored, original), name
        assert restored.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert live()["allocations"] == 1  # the buffer is emulated device memory
    del buffer, views, restored
    assert live()["allocations"] == 0


def test_restore_snapshot_without_an_engine_makes_and_closes_one():
    snapshot = FakeSnapshot(sample_tensors())
    buffer, views, _ = restore_snapshot(snapshot, "cpu", strategy="staging")
    assert torch.equal(views["weight"], sample_tensors()["weight"])
    assert live()["streams"] == live()["host_allocations"] == 0
    del buffer, views
    assert live() == NOTHING_LIVE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_real_snapshot_attached_read_only_restores_exactly_with_every_strategy(engine, strategy):
    # What a worker does: the snapshot is a read-only mapping of another's segment.
    tensors = sample_tensors()
    with Snapshot.pack(tensors) as packed, Snapshot.attach(packed.name) as attached:
        buffer, views, stats = restore_snapshot(attached, "cpu", engine=engine, strategy=strategy,
                                                chunk_bytes=4096, threads=2)
        assert stats.strategy == strategy and stats.nbytes == attached.nbytes
        for name, original in tensors.items():
            assert views[name].stride() == original.stride(), name
            assert torch.equal(views[name], original), name
        del buffer, views
    assert live()["allocations"] == live()["registrations"] == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failed_restore_snapshot_frees_its_buffer(engine, strategy):
    zengine.set_emulated_faults(EmulatedFaults(fail_after_bytes=1000))
    with pytest.raises(CudaError):
        restore_snapshot(FakeSnapshot(sample_tensors()), engine=engine, strategy=strategy, chunk_bytes=512)
    assert live()["allocations"] == 0 and live()["registrations"] == 0


# --- bad input -----------------------------------------------------------------------------


def test_bad_arguments_are_refused_before_anything_is_taken(engine):
    src = random_bytes(10_000)
    dst = np.zeros_like(src)
    before = live()
    bad_calls = {
        "strategy 'fastest' is unknown": lambda: engine.restore(src, dst, strategy="fastest"),
        "nbytes must be a positive": lambda: engine.restore(src, dst, 0),
        "nbytes must be a positive ": lambda: engine.restore(src, dst, -5),
        "runs past the source": lambda: engine.restore(src[:100], dst, 200),
        "runs past the destination": lambda: engine.restore(src, dst[:100], 200),
        "nbytes is needed": lambda: engine.restore(src.ctypes.data, dst.ctypes.data),
        "chunk_bytes must be a positive": lambda: engine.restore(src, dst, chunk_bytes=0),
        "streams must be a whole number from 1": lambda: engine.restore(src, dst, streams=0),
        "threads must be a whole number from 1": lambda: engine.restore(src, dst, threads=1000),
        "must be contiguous": lambda: engine.restore(torch.zeros(10, 10, dtype=torch.uint8).t(), dst),
        "must be C-contiguous": lambda: engine.restore(src.reshape(100, 100).T, dst),
        "must be an address": lambda: engine.restore("src", dst),
        "address must be a positive": lambda: engine.restore(0, dst, 10),
        "backend 'tpu' is unknown": lambda: Engine("tpu"),
        "device must be a device index": lambda: Engine("emulated", -1),
        "device 5 does not exist": lambda: Engine("emulated", 5),
        "snapshot has no 'address'": lambda: restore_snapshot(object(), "cpu"),
        "cannot restore to meta": lambda: restore_snapshot(FakeSnapshot(sample_tensors()), "meta"),
        "does not match the engine": lambda: restore_snapshot(FakeSnapshot(sample_tensors()), "cuda", engine=engine),
        "give the device": lambda: restore_snapshot(FakeSnapshot(sample_tensors())),
    }
    for expected, call in bad_calls.items():
        with pytest.raises(InvalidArgument, match=expected.strip()):
            call()
        assert live() == before, expected


def test_closed_engine_refuses_work():
    engine = Engine("emulated")
    engine.close()
    engine.close()
    with pytest.raises(InvalidArgument, match="closed"):
        engine.restore(random_bytes(10), np.zeros(10, dtype=np.uint8))


# --- a real GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_restore_is_bit_exact(strategy):
    src = random_bytes(64 * MiB + 12345)
    with Engine("cuda") as engine:
        buffer = engine.alloc_buffer(src.nbytes)
        engine.restore(src, buffer, strategy=strategy)
        assert np.array_equal(buffer.cpu().numpy(), src)
        back = np.zeros_like(src)
        engine.copy_to_host(back, buffer)
        assert np.array_equal(back, src)


@pytest.mark.gpu
def test_cuda_restore_snapshot_rebuilds_every_tensor():
    tensors = sample_tensors()
    buffer, views, _ = restore_snapshot(FakeSnapshot(tensors), "cuda")
    assert buffer.device.type == "cuda"
    for name, original in tensors.items():
        assert views[name].device.type == "cuda"
        assert views[name].stride() == original.stride()
        assert torch.equal(views[name].cpu(), original), name
