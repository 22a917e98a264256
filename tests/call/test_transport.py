"""zerogpu.call.transport: messages, tensors and exceptions between a caller and its forked worker."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
from typing import Callable, Iterator

import hypothesis.strategies as st
import posix_ipc
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from zerogpu.call import messages, transport
from zerogpu.errors import RemoteError, SerializationError
from zerogpu.call.transport import (
    Channel,
    ExceptionPayload,
    RemoteTraceback,
    capture_exception,
    discard,
    dumps,
    loads,
    rebuild_exception,
    remove_segments_of,
    segments_of,
)

MiB = 2**20
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def channels() -> Iterator[tuple[Channel, Channel]]:
    left, right = socket.socketpair()
    with Channel(left) as parent_end, Channel(right) as worker_end:
        yield parent_end, worker_end


@contextlib.contextmanager
def forked(child: Callable[[], None], *close_in_parent: Channel) -> Iterator[int]:
    """Run child() in a forked process; the block gets its pid; it is reaped at the end.

    The child exits with os._exit: 0 when child() returned, 1 when it raised.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # torch's OpenMP threads hang in a child forked after the parent used them.
            torch.set_num_threads(1)
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    for end in close_in_parent:
        end.close()
    try:
        yield pid
    finally:
        reap(pid)


def reap(pid: int, timeout: float = 30.0) -> int | None:
    """Wait for pid (killing it after timeout); its exit code, or None if it was reaped already."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def wait_exit(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach().resolve_conj().resolve_neg())
    return dense.reshape(-1).view(torch.uint8)


def assert_same_tensor(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.stride() == expected.stride()
    assert got.requires_grad == expected.requires_grad
    assert got.device.type == "cpu"
    assert torch.equal(bits(got), bits(expected)), "the bytes differ"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    count = 1
    for size in shape:
        count *= size
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def shm_mapping_of(tensor: torch.Tensor) -> str | None:
    """The /dev/shm file whose mapping holds the tensor's data, from /proc/self/maps."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end and len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                return fields[5].strip()
    return None


@dataclasses.dataclass
class Point:
    x: int
    y: list[int]


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


class DetailedError(Exception):
    def __init__(self, message: str, code: int = 0):
        super().__init__(message, code)
        self.code = code

    def __str__(self) -> str:
        return f"{self.args[0]} (code {self.code})"


class LockedError(Exception):
    """An exception carrying something that cannot be pickled."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()


class RenamedArgsError(Exception):
    """A custom __init__ whose arguments are not its args: pickle cannot rebuild it."""

    def __init__(self, path: str, line: int):
        super().__init__(f"{path}:{line}: broken")


# -- plain objects across fork -------------------------------------------------------------


def test_plain_objects_round_trip_across_fork(channels):
    parent_end, worker_end = channels
    objects = [
        None,
        True,
        12345678901234567890,
        -1.5,
        "héllo wörld",
        b"\x00\x01bytes",
        bytearray(b"mutable"),
        [1, [2, [3]], (4, 5), {6, 7}],
        {"nested": {"list": [1, 2], "tuple": (None,)}, 3: frozenset({1})},
        Point(1, [2, 3]),
        range(3, 30, 3),
    ]

    def echo():
        for _ in objects:
            worker_end.send(worker_end.recv(timeout=10), to_device=False)

    with forked(echo, worker_end) as pid:
        for obj in objects:
            parent_end.send(obj, to_device=True)
            got = parent_end.recv(timeout=10)
            assert got == obj and type(got) is type(obj)
        assert wait_exit(pid) == 0


def test_lambdas_and_closures_cross_fork(channels):
    parent_end, worker_end = channels
    base = 10

    def add_base(value):
        return value + base

    def worker():
        function, square = worker_end.recv(timeout=10)
        offset = 7
        worker_end.send((function(1), square(4), lambda value: value - offset), to_device=False)

    with forked(worker, worker_end) as pid:
        parent_end.send((add_base, lambda value: value * value), to_device=True)
        added, squared, subtract = parent_end.recv(timeout=10)
        assert (added, squared, subtract(10)) == (11, 16, 3)
        assert wait_exit(pid) == 0


# -- tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_of_every_dtype_round_trip_bit_exact_across_fork(channels, dtype):
    parent_end, worker_end = channels
    small = random_tensor(dtype, (3, 5), seed=1)
    large = random_tensor(dtype, (transport.TENSOR_SHM_THRESHOLD // dtype.itemsize + 16,), seed=2)
    tensors = {
        "small": small,
        "transposed": random_tensor(dtype, (4, 6), seed=3).t(),
        "strided": random_tensor(dtype, (9, 8), seed=4)[1::2, ::3],
        "scalar": random_tensor(dtype, (), seed=5),
        "empty": random_tensor(dtype, (0, 4), seed=6),
        "expanded": random_tensor(dtype, (1, 3), seed=7).expand(5, 3),
        "large": large,
        "large strided": large[3::5],
    }

    def echo():
        worker_end.send(worker_end.recv(timeout=30), to_device=False)

    with forked(echo, worker_end) as pid:
        parent_end.send(tensors, to_device=True)
        got = parent_end.recv(timeout=30)
        assert wait_exit(pid) == 0
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_same_tensor(got[name], tensor)


@pytest.mark.parametrize("size", [1024, 8 * MiB], ids=["inline", "shared memory"])
def test_tensors_sharing_storage_share_it_again(size):
    base = torch.arange(size // 4, dtype=torch.float32)
    message = {
        "base": base,
        "view": base[10:20],
        "transposed": base[:200].view(20, 10).t(),
        "as int": base.view(torch.int32)[5:],
        "again": base,
        "other": torch.zeros(4),
    }
    got = loads(dumps(message, to_device=False))
    assert got["again"] is got["base"]
    for name in ("view", "transposed", "as int"):
        assert got[name].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
        assert_same_tensor(got[name], message[name])
    assert got["other"].untyped_storage().data_ptr() != got["base"].untyped_storage().data_ptr()
    got["base"][15] = -1.0
    assert got["view"][5] == -1.0 and got["transposed"][5, 1] == -1.0


def test_only_the_bytes_in_use_travel():
    huge = torch.zeros(64 * MiB // 4)
    message = dumps(huge[1000:1010], to_device=False)
    assert len(message) < 4096
    assert torch.equal(loads(message), huge[1000:1010])


def test_large_tensor_is_mapped_from_shared_memory_and_its_name_is_gone():
    tensor = torch.randn(2 * transport.TENSOR_SHM_THRESHOLD // 4)
    message = dumps(tensor, to_device=False)
    assert len(message) < 4096, "a large tensor's bytes must not travel inside the message"
    (name,) = segments_of(os.getpid())
    got = loads(message)
    assert segments_of(os.getpid()) == []
    assert shm_mapping_of(got) == f"/dev/shm{name} (deleted)"
    assert torch.equal(got, tensor)


def test_shared_memory_segments_are_private_to_their_owner():
    message = dumps(torch.ones(transport.TENSOR_SHM_THRESHOLD), to_device=False)
    try:
        (name,) = segments_of(os.getpid())
        assert os.stat(f"/dev/shm{name}").st_mode & 0o777 == 0o600
    finally:
        discard(message)


@pytest.mark.slow
def test_a_gigabyte_tensor_result_comes_through_shared_memory(channels):
    parent_end, worker_end = channels
    count = 2**30 // 4

    def worker():
        worker_end.send(torch.arange(count, dtype=torch.int32), to_device=False)

    with forked(worker, worker_end) as pid:
        payload = parent_end.recv_bytes(timeout=120)
        assert wait_exit(pid) == 0
    assert len(payload) < 4096, f"{len(payload)} bytes went through the socket"
    (name,) = segments_of(pid)
    got = loads(payload)
    assert segments_of(pid) == []
    assert shm_mapping_of(got) == f"/dev/shm{name} (deleted)"
    assert got.dtype == torch.int32 and got.shape == (count,)
    step = 2**26
    for start in range(0, count, step):
        assert torch.equal(got[start : start + step], torch.arange(start, min(start + step, count), dtype=torch.int32))


def test_parameters_stay_parameters_with_their_flags_and_attributes():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    weight.tag = "tied"
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(5, requires_grad=True)
    computed = leaf * 2
    message = {"weight": weight, "frozen": frozen, "twice": (weight, weight), "computed": computed}
    got = loads(dumps(message, to_device=False))
    assert isinstance(got["weight"], torch.nn.Parameter) and got["weight"].requires_grad
    assert got["weight"].tag == "tied"
    assert got["twice"][0] is got["weight"] and got["twice"][1] is got["weight"]
    assert isinstance(got["frozen"], torch.nn.Parameter) and not got["frozen"].requires_grad
    assert type(got["computed"]) is torch.Tensor and got["computed"].requires_grad and got["computed"].is_leaf
    assert torch.equal(got["weight"].detach(), weight.detach())
    assert torch.equal(got["computed"].detach(), computed.detach())


def test_a_module_round_trips_with_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = model[0].weight
    got = loads(dumps(model, to_device=False))
    assert got[1].weight is got[0].weight
    inputs = torch.tensor([1, 2, 3])
    assert torch.equal(got(inputs), model(inputs))


def test_conjugate_and_negative_views_keep_their_values():
    complex_values = torch.randn(6, dtype=torch.complex64)
    conjugate = complex_values.conj()
    negative = torch._neg_view(torch.randn(4))
    got_conjugate, got_negative, got_values = loads(dumps((conjugate, negative, complex_values), to_device=False))
    assert got_conjugate.is_conj() and torch.equal(got_conjugate.resolve_conj(), conjugate.resolve_conj())
    assert got_negative.is_neg() and torch.equal(got_negative.resolve_neg(), negative.resolve_neg())
    assert got_conjugate.untyped_storage().data_ptr() == got_values.untyped_storage().data_ptr()


def test_sparse_tensors_round_trip():
    sparse = torch.sparse_coo_tensor([[0, 2], [1, 0]], [1.5, -2.0], (3, 3), check_invariants=True)
    got = loads(dumps(sparse, to_device=False))
    assert got.is_sparse and torch.equal(got.to_dense(), sparse.to_dense())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    view=st.sampled_from(["whole", "transposed", "sliced", "narrowed", "expanded"]),
    threshold=st.sampled_from([0, 64, 2**62]),
    seed=st.integers(0, 2**31),
)
def test_random_tensors_round_trip(dtype, shape, view, threshold, seed):
    tensor = random_tensor(dtype, shape, seed)
    if view == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    elif view == "sliced" and tensor.dim() >= 1:
        tensor = tensor[1::2]
    elif view == "narrowed" and tensor.dim() >= 1 and tensor.shape[0] >= 2:
        tensor = tensor.narrow(0, 1, tensor.shape[0] - 1)
    elif view == "expanded":
        tensor = tensor.unsqueeze(0).expand(3, *tensor.shape)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(messages, "TENSOR_SHM_THRESHOLD", threshold)
        got = loads(dumps([tensor, tensor], to_device=False))
    assert got[0] is got[1]
    assert_same_tensor(got[0], tensor)


# -- emulated and real device tensors ------------------------------------------------------


class EmulationStandIn(types.ModuleType):
    """The part of zerogpu.cuda.emulation that transport relies on: marks, and 'cuda' ops run on the CPU."""

    def __init__(self):
        super().__init__("zerogpu.cuda.emulation")
        self.marks = WeakIdKeyDictionary()

    def is_cuda(self, tensor: torch.Tensor) -> bool:
        return tensor in self.marks

    def mark(self, tensor: torch.Tensor) -> None:
        self.marks[tensor] = True


class StandInMode(TorchFunctionMode):
    """Moves to 'cuda' copy and mark; an op on marked tensors marks its result."""

    def __init__(self, emulation: EmulationStandIn):
        super().__init__()
        self.emulation = emulation

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and any(str(arg).startswith("cuda") for arg in (*args[1:], *kwargs.values())):
            result = args[0].clone()
            self.emulation.mark(result)
            return result
        result = func(*args, **kwargs)
        inputs = [arg for arg in args if isinstance(arg, torch.Tensor)]
        if isinstance(result, torch.Tensor) and inputs and all(self.emulation.is_cuda(arg) for arg in inputs):
            self.emulation.mark(result)
        return result


def test_emulated_cuda_tensors_are_rebuilt_on_the_worker_device(channels, monkeypatch):
    parent_end, worker_end = channels
    emulation = EmulationStandIn()
    monkeypatch.setitem(sys.modules, "zerogpu.cuda.emulation", emulation)
    weights = torch.randn(8 * MiB // 4)
    emulation.mark(weights)
    head = weights[:100]
    emulation.mark(head)
    plain = torch.randn(10)
    message = {"weights": weights, "head": head, "plain": plain}

    def worker():
        with StandInMode(emulation):
            got = worker_end.recv(timeout=30)
            report = {name: emulation.is_cuda(tensor) for name, tensor in got.items()}
            report["shared"] = got["head"].untyped_storage().data_ptr() == got["weights"].untyped_storage().data_ptr()
            worker_end.send((report, got), to_device=False)

    with forked(worker, worker_end) as pid:
        parent_end.send(message, to_device=True)
        report, returned = parent_end.recv(timeout=30)
        assert wait_exit(pid) == 0
    assert report == {"weights": True, "head": True, "plain": False, "shared": True}
    for name, tensor in message.items():
        assert not emulation.is_cuda(returned[name]), "results come back as plain CPU tensors"
        assert torch.equal(returned[name], tensor)


def test_with_zerogpu_emulation_device_tensors_stay_on_the_emulated_device(channels):
    emulation = pytest.importorskip("zerogpu.cuda.emulation")
    parent_end, worker_end = channels

    def worker():  # patched only in the child, so this test process keeps an unpatched torch
        emulation.patch()
        weights = torch.arange(8 * MiB // 4, dtype=torch.float32).to("cuda")
        parameter = torch.nn.Parameter(torch.ones(3).cuda())
        message = {"weights": weights, "head": weights[:10], "parameter": parameter, "plain": torch.ones(2)}
        moved = loads(dumps(message, to_device=True))
        returned = loads(dumps(message, to_device=False))
        worker_end.send(
            {
                "moved": {name: (emulation.is_cuda(tensor), str(tensor.device)) for name, tensor in moved.items()},
                "returned": {name: emulation.is_cuda(tensor) for name, tensor in returned.items()},
                "parameter": type(moved["parameter"]).__name__,
                "shared": moved["head"].untyped_storage().data_ptr() == moved["weights"].untyped_storage().data_ptr(),
                "equal": all(torch.equal(moved[name].cpu(), message[name].cpu()) for name in message),
                "result": returned["weights"],
            },
            to_device=False,
        )

    with forked(worker, worker_end) as pid:
        report = parent_end.recv(timeout=60)
        assert wait_exit(pid) == 0
    assert report["moved"] == {
        "weights": (True, "cuda:0"),
        "head": (True, "cuda:0"),
        "parameter": (True, "cuda:0"),
        "plain": (False, "cpu"),
    }
    assert report["returned"] == {"weights": False, "head": False, "parameter": False, "plain": False}
    assert report["parameter"] == "Parameter" and report["shared"] and report["equal"]
    assert torch.equal(report["result"], torch.arange(8 * MiB // 4, dtype=torch.float32))


def test_without_emulation_no_tensor_is_a_device_tensor(monkeypatch):
    monkeypatch.delitem(sys.modules, "zerogpu.cuda.emulation", raising=False)
    tensor = torch.randn(8 * MiB // 4)
    # loads() would call .to('cuda') for a device tensor, which fails on a machine without CUDA.
    got = loads(dumps([tensor, tensor[:3]], to_device=True))
    assert torch.equal(got[0], tensor) and got[0].device.type == "cpu"


@pytest.mark.gpu
def test_cuda_tensors_come_back_on_the_cpu_and_go_to_the_device(channels):
    parent_end, worker_end = channels

    def worker():  # CUDA only in the child: the parent must not create a context
        small = torch.arange(100, dtype=torch.float32, device="cuda")
        large = torch.arange(4 * MiB, dtype=torch.float32, device="cuda")
        moved = loads(dumps([large, large[10:], small], to_device=True))
        same = [tensor.is_cuda for tensor in moved] + [
            moved[0].untyped_storage().data_ptr() == moved[1].untyped_storage().data_ptr(),
            torch.equal(moved[0], large),
            torch.equal(moved[2], small),
        ]
        worker_end.send((same, small, large, large[1::3]), to_device=False)

    with forked(worker, worker_end) as pid:
        same, small, large, strided = parent_end.recv(timeout=60)
        assert wait_exit(pid) == 0
    assert all(same)
    assert small.device.type == large.device.type == strided.device.type == "cpu"
    assert torch.equal(large, torch.arange(4 * MiB, dtype=torch.float32))
    assert torch.equal(strided, torch.arange(4 * MiB, dtype=torch.float32)[1::3])


# -- what cannot be pickled ----------------------------------------------------------------


def test_unpicklable_argument_names_its_type_and_place():
    arguments = {"prompt": "hi", "x": [1, threading.Lock()], "weights": torch.zeros(2 * MiB)}
    with pytest.raises(SerializationError, match=r"arguments\['x'\]\[1\] \(a _thread.lock\) cannot be pickled"):
        dumps(arguments, to_device=True, what="arguments")
    assert segments_of(os.getpid()) == []


def test_unpicklable_variable_of_a_closure_is_named():
    lock = threading.RLock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match=r"arguments\[0\]'s variable 'lock' \(a _thread.RLock\)"):
        dumps((uses_lock,), to_device=True, what="arguments")


def test_object_whose_reduce_fails_is_named_with_the_reason():
    with pytest.raises(SerializationError, match=r"result\.inner \(a test_transport.Unpicklable\).*refuses"):
        dumps(types.SimpleNamespace(inner=Unpicklable()), to_device=False, what="result")


def test_too_deeply_nested_value_says_so():
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(SerializationError, match="result is nested too deeply to be pickled"):
        dumps(nested, to_device=False, what="result")


def test_unpicklable_result_fails_in_the_worker_with_its_type(channels):
    parent_end, worker_end = channels

    def worker():
        try:
            worker_end.send((number for number in range(3)), to_device=False, what="result")
        except SerializationError as error:
            worker_end.send(str(error), to_device=False)

    with forked(worker, worker_end) as pid:
        message = parent_end.recv(timeout=10)
        assert wait_exit(pid) == 0
    assert message.startswith("result (a generator) cannot be pickled")


def test_a_failed_segment_leaves_no_segment_behind(monkeypatch):
    created = []
    real = posix_ipc.SharedMemory

    def fail_second(name, *args, **kwargs):
        if args or kwargs:
            created.append(name)
            if len(created) == 2:
                raise posix_ipc.Error("no space left")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(posix_ipc, "SharedMemory", fail_second)
    with pytest.raises(SerializationError, match="could not create a shared-memory segment"):
        dumps([torch.zeros(2 * MiB), torch.ones(2 * MiB)], to_device=False)
    assert len(created) == 2
    assert segments_of(os.getpid()) == []


def test_a_full_shared_memory_is_an_error_not_a_crash(monkeypatch):
    def no_space(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(SerializationError, match=r"No space left on device.*free space in /dev/shm"):
        dumps(torch.zeros(2 * MiB), to_device=False)
    assert segments_of(os.getpid()) == []


# -- exceptions ----------------------------------------------------------------------------


def raise_in_worker(channel: Channel, error: Callable[[], BaseException]) -> Callable[[], None]:
    def worker():
        try:
            raise error()
        except BaseException as exc:
            channel.send(capture_exception(exc), to_device=False)

    return worker


def remote(channels, error: Callable[[], BaseException]) -> tuple[BaseException, ExceptionPayload]:
    parent_end, worker_end = channels
    with forked(raise_in_worker(worker_end, error), worker_end) as pid:
        payload = parent_end.recv(timeout=10)
        assert wait_exit(pid) == 0
    assert isinstance(payload, ExceptionPayload)
    return rebuild_exception(payload), payload


def test_user_exception_comes_back_with_type_message_and_traceback(channels):
    def fail():
        return ValueError("bad prompt")

    rebuilt, payload = remote(channels, fail)
    assert type(rebuilt) is ValueError and str(rebuilt) == "bad prompt"
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert str(rebuilt.__cause__) == payload.traceback
    assert "Traceback (most recent call last)" in payload.traceback
    assert "raise error()" in payload.traceback and "ValueError: bad prompt" in payload.traceback


def test_exception_with_attributes_is_rebuilt(channels):
    rebuilt, _ = remote(channels, lambda: DetailedError("quota", code=7))
    assert type(rebuilt) is DetailedError and rebuilt.code == 7 and str(rebuilt) == "quota (code 7)"


def test_unpicklable_exception_becomes_remote_error(channels):
    rebuilt, payload = remote(channels, lambda: LockedError("holds a lock"))
    assert payload.pickled is None
    assert type(rebuilt) is RemoteError
    assert rebuilt.type_name == "test_transport.LockedError"
    assert rebuilt.message == "holds a lock"
    assert "LockedError: holds a lock" in rebuilt.traceback
    assert str(rebuilt.__cause__) == rebuilt.traceback


def test_exception_with_custom_init_signature_becomes_remote_error(channels):
    rebuilt, _ = remote(channels, lambda: RenamedArgsError("model.py", 3))
    assert type(rebuilt) is RemoteError
    assert (rebuilt.type_name, rebuilt.message) == ("test_transport.RenamedArgsError", "model.py:3: broken")


def test_exception_class_only_the_worker_has_becomes_remote_error(channels, tmp_path):
    (tmp_path / "worker_only_errors.py").write_text("class WorkerOnlyError(Exception):\n    pass\n")

    def error():
        sys.path.insert(0, str(tmp_path))
        from worker_only_errors import WorkerOnlyError

        return WorkerOnlyError("only here")

    rebuilt, payload = remote(channels, error)
    assert payload.pickled is not None, "it pickles in the worker; the caller cannot import it"
    assert "worker_only_errors" not in sys.modules
    assert type(rebuilt) is RemoteError
    assert (rebuilt.type_name, rebuilt.message) == ("worker_only_errors.WorkerOnlyError", "only here")


def test_exception_whose_str_fails_is_still_reported():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    try:
        raise Unprintable()
    except Unprintable as exc:
        payload = capture_exception(exc)
    rebuilt = rebuild_exception(payload)
    assert payload.message == "<unprintable Unprintable object>"
    assert type(rebuilt).__name__ in ("Unprintable", "RemoteError")


@pytest.mark.slow
def test_classes_of_the_main_module_keep_their_identity(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, socket
            from zerogpu.call.transport import Channel, capture_exception, rebuild_exception

            class QuotaError(Exception):
                pass

            class Answer:
                def __init__(self, text):
                    self.text = text

            left, right = socket.socketpair()
            parent_end, worker_end = Channel(left), Channel(right)
            pid = os.fork()
            if pid == 0:
                worker_end.send(Answer("42"), to_device=False)
                try:
                    raise QuotaError("out of quota")
                except QuotaError as exc:
                    worker_end.send(capture_exception(exc), to_device=False)
                os._exit(0)
            answer = parent_end.recv(timeout=10)
            error = rebuild_exception(parent_end.recv(timeout=10))
            os.waitpid(pid, 0)
            assert type(answer) is Answer and answer.text == "42", type(answer)
            try:
                raise error
            except QuotaError as caught:
                print("caught", caught)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "caught out of quota"


# -- framing ------------------------------------------------------------------------------


def test_recv_times_out_when_nothing_comes(channels):
    parent_end, _ = channels
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        parent_end.recv(timeout=0.05)
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError):
        parent_end.recv(timeout=0)


def test_recv_raises_eof_when_the_peer_closes(channels):
    parent_end, worker_end = channels
    worker_end.send("last", to_device=False)
    worker_end.close()
    assert parent_end.recv(timeout=1) == "last"
    with pytest.raises(EOFError):
        parent_end.recv(timeout=1)
    with pytest.raises(EOFError):
        parent_end.recv()


def test_eof_in_the_middle_of_a_frame_says_so():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        right.sendall(struct.pack("<Q", 100) + b"x" * 10)
        right.close()
        with pytest.raises(EOFError, match="middle of a frame"):
            channel.recv(timeout=1)
        with pytest.raises(EOFError, match="middle of a frame"):
            channel.recv(timeout=1)


def test_a_frame_that_times_out_half_read_completes_on_the_next_recv():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        payload = dumps({"text": "x" * 100_000}, to_device=False)
        frame = struct.pack("<Q", len(payload)) + payload
        right.sendall(frame[:5])
        with pytest.raises(TimeoutError):
            channel.recv(timeout=0.05)
        right.sendall(frame[5:50_000])
        with pytest.raises(TimeoutError):
            channel.recv(timeout=0.05)
        right.sendall(frame[50_000:])
        assert channel.recv(timeout=1) == {"text": "x" * 100_000}
        right.close()


def test_frames_sent_together_arrive_whole_and_in_order(channels):
    parent_end, worker_end = channels
    blob = os.urandom(3 * MiB)  # past the read-ahead and SMALL_FRAME: read straight into its own buffer
    worker_end.send_many(["first", {"second": 2}], to_device=False)
    assert parent_end.recv(timeout=1) == "first"
    # The rest of what one read took is kept: the socket has no more to say about the second frame.
    assert parent_end.buffered()
    assert parent_end.recv(timeout=0) == {"second": 2}
    payloads = [dumps(value, to_device=False) for value in ("third", blob, "last")]
    sender = threading.Thread(target=worker_end.send_bytes, args=payloads)  # more than a socket buffer holds
    sender.start()
    assert [parent_end.recv(timeout=5) for _ in range(3)] == ["third", blob, "last"]
    sender.join()
    assert not parent_end.buffered()
    with pytest.raises(TimeoutError):
        parent_end.recv(timeout=0)


def test_plain_messages_travel_with_the_others_in_one_write(channels):
    """zerogpu's own small messages ("running", "done") skip cloudpickle and the storage table."""
    parent_end, worker_end = channels
    worker_end.send_plain(("running",))
    worker_end.send_many([("return", torch.arange(3))], to_device=False, plain=(("done", {"run_s": 0.5}),))
    assert parent_end.recv(timeout=5) == ("running",)
    verb, value = parent_end.recv(timeout=5)
    assert verb == "return" and torch.equal(value, torch.arange(3))
    assert parent_end.buffered()  # the value and the "done" came in one write
    assert parent_end.recv(timeout=0) == ("done", {"run_s": 0.5})
    plain = transport.dumps_plain(("call", "app:f", None))
    assert plain.startswith(messages.PLAIN) and loads(plain) == ("call", "app:f", None)
    discard(plain)  # names no segment: nothing to release, and no error


def test_a_message_that_cannot_be_pickled_sends_none_of_its_group(channels):
    parent_end, worker_end = channels
    with pytest.raises(SerializationError):
        worker_end.send_many(["fine", threading.Lock()], to_device=False)
    worker_end.send("after", to_device=False)
    assert parent_end.recv(timeout=1) == "after"


def test_eof_after_frames_sent_together_comes_after_them():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        frames = b"".join(struct.pack("<Q", len(p)) + p for p in (dumps(n, to_device=False) for n in (1, 2)))
        right.sendall(frames + struct.pack("<Q", 100) + b"x" * 10)
        right.close()
        assert channel.recv(timeout=1) == 1 and channel.recv(timeout=1) == 2
        with pytest.raises(EOFError, match="10 of the 100 bytes of its payload"):
            channel.recv(timeout=1)


def test_large_frames_cross_the_socket_in_both_directions(channels):
    parent_end, worker_end = channels
    blob = os.urandom(8 * MiB)  # not a tensor: it travels inside the frame

    def echo():
        worker_end.send(worker_end.recv(timeout=30), to_device=False)

    with forked(echo, worker_end) as pid:
        parent_end.send(blob, to_device=True)
        assert parent_end.recv(timeout=30) == blob
        assert wait_exit(pid) == 0


def test_signals_during_send_and_recv_do_not_break_frames(channels):
    parent_end, worker_end = channels
    blob = os.urandom(32 * MiB)  # larger than the socket buffer: both sides block many times
    interrupted = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: interrupted.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        sender = threading.Thread(target=lambda: (time.sleep(0.05), worker_end.send(blob, to_device=False)))
        sender.start()
        got = parent_end.recv(timeout=60)
        sender.join()
        with pytest.raises(TimeoutError):
            parent_end.recv(timeout=0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert got == blob
    assert interrupted, "no signal arrived while the frame was in flight"


def test_an_oversized_frame_header_is_refused_without_allocating():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        right.sendall(struct.pack("<Q", 2**41))
        with pytest.raises(SerializationError, match="stream is corrupt"):
            channel.recv(timeout=1)
        with pytest.raises(SerializationError, match="stream is corrupt"):
            channel.recv(timeout=1)
        right.close()


def test_a_lying_frame_length_ends_in_eof_without_taking_the_memory():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        right.sendall(struct.pack("<Q", 2**33) + b"short")  # 8 GiB announced, 5 bytes sent
        right.close()
        before = psutil.Process().memory_info().rss
        with pytest.raises(EOFError, match="middle of a frame"):
            channel.recv(timeout=5)
        assert psutil.Process().memory_info().rss - before < 64 * MiB


def test_a_frame_too_large_for_this_machine_is_refused():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        right.sendall(struct.pack("<Q", 2**39))  # 512 GiB: under the sanity limit, over any RAM here
        with pytest.raises(SerializationError, match="cannot hold a frame"):
            channel.recv(timeout=5)
        with pytest.raises(SerializationError, match="cannot hold a frame"):
            channel.recv(timeout=5)
        right.close()


@pytest.mark.parametrize(
    "payload",
    [b"", b"ZG", b"garbage that is not a message", b"ZGT1\xff\xff\x00\x00", b"ZGP1\x80\x05not a pickle"],
    ids=["empty", "short", "garbage", "truncated table", "plain, corrupt"],
)
def test_corrupt_messages_raise_serialization_error(payload):
    with pytest.raises(SerializationError):
        loads(payload)


def test_truncated_and_tampered_messages_raise_serialization_error():
    message = dumps({"tensor": torch.arange(1000), "text": "hello"}, to_device=False)
    with pytest.raises(SerializationError):
        loads(message[:-20])
    with pytest.raises(SerializationError):
        loads(message[:40])


def test_a_tensor_reaching_past_the_bytes_sent_is_refused():
    message = dumps(torch.arange(10), to_device=False)
    magic, head_len = messages.PREFIX.unpack_from(message)
    start = messages.PREFIX.size
    ((lo, nbytes, size, name),) = pickle.loads(message[start : start + head_len])
    assert (nbytes, name) == (80, None)
    head = pickle.dumps([(lo, 40, 48, None)])
    body = message[start + head_len + nbytes :]
    forged = messages.PREFIX.pack(magic, len(head)) + head + message[start + head_len : start + head_len + 40] + body
    with pytest.raises(SerializationError, match="lies outside the bytes sent"):
        loads(forged)


@pytest.mark.parametrize(
    "entry",
    [(0, 16, 16, "/zerogpu-1-0123abcd"), (0, 16, 2**50, None), (-16, 16, 16, None), (0, "16", 16, None), "entry"],
    ids=["foreign segment", "huge buffer", "negative offset", "not a number", "not an entry"],
)
def test_a_corrupt_storage_table_is_refused(entry):
    head = pickle.dumps([entry])
    with pytest.raises(SerializationError, match="table of a message is corrupt"):
        loads(messages.PREFIX.pack(messages.MAGIC, len(head)) + head + bytes(16))


def test_send_to_a_closed_peer_raises_eof_and_releases_segments(channels):
    parent_end, worker_end = channels
    worker_end.close()
    with pytest.raises(EOFError):
        parent_end.send(torch.zeros(2 * MiB), to_device=False)
    assert segments_of(os.getpid()) == []


def test_send_bytes_sends_a_message_pickled_earlier(channels):
    parent_end, worker_end = channels
    payload = dumps(("call", [1, 2]), to_device=True)
    parent_end.send_bytes(payload)
    assert worker_end.recv(timeout=1) == ("call", [1, 2])


def test_channel_fileno_is_the_socket():
    left, right = socket.socketpair()
    with Channel(left) as channel:
        assert channel.fileno() == left.fileno()
    right.close()


# -- segments a worker leaves behind -------------------------------------------------------


def test_remove_segments_of_a_worker_that_died_before_sending():
    def worker():
        dumps(torch.zeros(2 * MiB), to_device=False)  # its segment exists; nobody will load it
        os._exit(0)

    with forked(worker) as pid:
        assert wait_exit(pid) == 0
        assert len(segments_of(pid)) == 1
        remove_segments_of(pid)
        assert segments_of(pid) == []
        remove_segments_of(pid)  # nothing left: a no-op


def test_discard_releases_a_message_that_will_never_be_loaded():
    message = dumps([torch.zeros(2 * MiB), torch.ones(2 * MiB)], to_device=True)
    assert len(segments_of(os.getpid())) == 2
    discard(message)
    assert segments_of(os.getpid()) == []
    discard(message)
    with pytest.raises(SerializationError, match="is gone"):
        loads(message)


def test_loading_twice_says_the_segment_is_gone():
    message = dumps(torch.zeros(2 * MiB), to_device=False)
    loads(message)
    with pytest.raises(SerializationError, match="is gone"):
        loads(message)
