"""Shared-memory snapshots: round trips, sharing, lifetime, attach from other processes, bad input."""

from __future__ import annotations

import atexit
import ctypes
import errno
import gc
import json
import mmap
import multiprocessing
import os
import pickle
import re
import resource
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerogpu.snapshot import snapshot as snapshot_module
from zerogpu.errors import InvalidArgument, SnapshotError
from zerogpu.snapshot.packing import give_back_freed_memory
from zerogpu.snapshot.manifest import DTYPES, HEADER
from zerogpu.snapshot.snapshot import Snapshot, sweep

SHM_DIR = "/dev/shm"
MiB = 2**20


# ---- helpers


def segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("zerogpu-")}


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of every byte of the tensor's storage, inside its view or not."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).clone()


def element_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of the tensor's elements, in order."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def assert_same_tensors(original: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]) -> None:
    """Same names, layouts and bytes (bit for bit), and the same storage sharing."""
    assert list(restored) == list(original)
    for name, tensor in original.items():
        copy = restored[name]
        assert (copy.dtype, copy.shape, copy.stride(), copy.storage_offset()) == \
            (tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset()), name
        assert torch.equal(storage_bytes(copy), storage_bytes(tensor)), name
    names = list(original)
    for first in names:
        for second in names:
            if original[first].untyped_storage().nbytes() == 0:
                continue
            shared = storage_key(original[first]) == storage_key(original[second])
            assert (storage_key(restored[first]) == storage_key(restored[second])) == shared, (first, second)


def random_storage(nbytes: int, seed: int = 0) -> torch.UntypedStorage:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).untyped_storage()


def view(storage: torch.UntypedStorage, dtype: torch.dtype, shape=None, stride=None, offset: int = 0) -> torch.Tensor:
    tensor = torch.empty(0, dtype=dtype)
    if shape is None:
        return tensor.set_(storage)
    return tensor.set_(storage, offset, shape, stride)


def restored_copy(snapshot: Snapshot) -> torch.Tensor:
    """What a restore makes: the data region copied, from `address` and `nbytes`, into a buffer of its own."""
    buffer = torch.empty(snapshot.nbytes, dtype=torch.uint8)
    ctypes.memmove(buffer.data_ptr(), snapshot.address, snapshot.nbytes)
    return buffer


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (RssAnon, RssShmem, VmLck)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def mapping_permissions(address: int) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, permissions = line.split()[:2]
            start, end = (int(part, 16) for part in span.split("-"))
            if start <= address < end:
                return permissions
    raise LookupError(hex(address))


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def model_like() -> dict[str, torch.Tensor]:
    """Tied weights, views, slices, transposes, dtype views, broadcasts, 0-dim and empty tensors."""
    torch.manual_seed(0)
    embedding = torch.randn(100, 16)
    weight = torch.randn(32, 16, dtype=torch.float64)
    qkv = torch.randn(48, 16).to(torch.bfloat16)
    return {
        "embed.weight": embedding,
        "lm_head.weight": embedding,  # tied: the same tensor twice
        "proj.weight": weight,
        "proj.weight_t": weight.t(),
        "proj.rows": weight[4:20:3],
        "proj.as_int64": weight.view(torch.int64),
        "q": qkv[:16],
        "k": qkv[16:32],
        "v": qkv[32:],
        "bias": torch.randn(16, dtype=torch.float16),
        "bias.expanded": torch.randn(16).expand(4, 16),
        "scale": torch.tensor(0.5),
        "mask": torch.rand(8) > 0.5,
        "empty": torch.empty(0, 7),
        "phase": torch.randn(5, dtype=torch.complex64),
        "fp8": torch.randn(9).to(torch.float8_e5m2),
    }


# ---- round trips


@st.composite
def tensor_sets(draw) -> dict[str, torch.Tensor]:
    """Random views of a few random storages: any dtype, shape, stride (0 too) and offset."""
    storages = [random_storage(draw(st.integers(0, 300)), seed=draw(st.integers(0, 2**16)))
                for _ in range(draw(st.integers(1, 4)))]
    tensors: dict[str, torch.Tensor] = {}
    for index in range(draw(st.integers(0, 8))):
        if tensors and draw(st.booleans()) and draw(st.booleans()):
            tensors[f"t{index}"] = tensors[draw(st.sampled_from(sorted(tensors)))]  # the same tensor again
            continue
        storage = draw(st.sampled_from(storages))
        dtype = draw(st.sampled_from(sorted(DTYPES.values(), key=str)))
        capacity = storage.nbytes() // dtype.itemsize
        ndim = draw(st.integers(0, 3))
        shape = draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
        stride = draw(st.lists(st.integers(0, 8), min_size=ndim, max_size=ndim))
        span = 0 if 0 in shape else 1 + sum((size - 1) * step for size, step in zip(shape, stride))
        if span > capacity:
            shape = [0] * ndim
            span = 0
        offset = draw(st.integers(0, capacity - span))
        tensors[f"t{index}"] = view(storage, dtype, shape, stride, offset)
    return tensors


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensor_sets())
def test_round_trip_of_random_views_is_exact(tensors):
    with Snapshot.pack(tensors) as snapshot:
        assert_same_tensors(tensors, snapshot.tensors())
        assert_same_tensors(tensors, snapshot.views(restored_copy(snapshot)))
        with Snapshot.attach(snapshot.name) as attached:
            assert_same_tensors(tensors, attached.tensors())


def test_shared_storage_comes_back_shared():
    tensors = model_like()
    with Snapshot.pack(tensors) as snapshot:
        restored = snapshot.tensors()
        assert_same_tensors(tensors, restored)
        assert restored["embed.weight"] is not restored["lm_head.weight"]
        # Each storage is stored once.
        distinct = {storage_key(tensor) for tensor in tensors.values()}
        assert snapshot.nbytes < sum(nbytes for _, nbytes in distinct) + 256 * len(distinct)
        # Writing through one restored view shows through the others, as before packing.
        views = snapshot.views(restored_copy(snapshot))
        views["proj.weight"][5, 3] = 42.0
        assert views["proj.weight_t"][3, 5] == 42.0
        assert views["proj.as_int64"][5, 3] == torch.tensor(42.0, dtype=torch.float64).view(torch.int64)
        views["embed.weight"][0, 0] = 7.0
        assert views["lm_head.weight"][0, 0] == 7.0
        views["k"].zero_()
        assert torch.equal(views["q"], tensors["q"]) and torch.equal(views["v"], tensors["v"])


@pytest.mark.parametrize("dtype", sorted(DTYPES.values(), key=str), ids=str)
def test_every_fixed_size_dtype_round_trips_bit_exactly(dtype):
    storage = random_storage(64 * dtype.itemsize, seed=hash(str(dtype)) % 2**16)
    tensors = {
        "full": view(storage, dtype),
        "matrix_t": view(storage, dtype, (4, 8), (1, 4), offset=3),
        "scalar": view(storage, dtype, (), (), offset=5),
        "empty": torch.empty(0, 3, dtype=dtype),
        "fresh_scalar": view(random_storage(dtype.itemsize, seed=1), dtype, (), ()),
    }
    with Snapshot.pack(tensors) as snapshot:
        assert_same_tensors(tensors, snapshot.tensors())
        assert_same_tensors(tensors, snapshot.views(restored_copy(snapshot)))


def test_overlapping_storages_alias_after_restore():
    raw = bytearray(os.urandom(4096))
    low = torch.frombuffer(raw, dtype=torch.uint8, count=3000)  # two storages over one buffer
    high = torch.frombuffer(raw, dtype=torch.float32, offset=2048, count=512)
    assert storage_key(low) != storage_key(high)
    tensors = {"low": low, "high": high}
    with Snapshot.pack(tensors) as snapshot:
        assert_same_tensors(tensors, snapshot.tensors())
        assert snapshot.nbytes == 4096
        views = snapshot.views(torch.zeros(snapshot.nbytes, dtype=torch.uint8))
        views["high"][0] = 1.0
        assert bytes(views["low"][2048:2052].numpy()) == struct.pack("<f", 1.0)


def test_storages_are_aligned():
    tensors = {"small": torch.randn(3), "odd": torch.randn(7).to(torch.float16), "large": torch.randn(MiB // 4 + 1),
               "byte": torch.ones(1, dtype=torch.uint8), "after": torch.randn(5)}
    with Snapshot.pack(tensors) as snapshot:
        assert snapshot.address % mmap.PAGESIZE == 0
        for entry in snapshot.entries:
            assert entry.offset % (mmap.PAGESIZE if entry.nbytes >= MiB else 256) == 0, entry
        for tensor in snapshot.tensors().values():
            assert tensor.untyped_storage().data_ptr() % 256 == 0


def test_entries_follow_packing_order():
    tensors = {"b": torch.randn(4), "a": torch.randn(2), "c": torch.randn(3)}
    with Snapshot.pack(tensors) as snapshot:
        assert [entry.name for entry in snapshot.entries] == ["b", "a", "c"]
        assert [entry.offset for entry in snapshot.entries] == sorted(entry.offset for entry in snapshot.entries)


def test_empty_snapshot():
    with Snapshot.pack({}) as snapshot:
        assert (snapshot.nbytes, snapshot.entries, snapshot.tensors()) == (0, [], {})
        with Snapshot.attach(snapshot.name) as attached:
            assert attached.tensors() == {}


def test_progress_counts_every_byte():
    tensors = {"a": torch.randn(1000), "b": torch.randn(10), "tied": None}
    tensors["tied"] = tensors["a"]
    reports: list[int] = []
    with Snapshot.pack(tensors, progress=reports.append) as snapshot:
        assert sum(reports) == 4000 + 40  # "tied" is stored once
        assert all(report > 0 for report in reports)
        assert_same_tensors(tensors, snapshot.tensors())


def test_a_failing_progress_callback_leaves_nothing_behind():
    def fail(nbytes: int) -> None:
        raise KeyboardInterrupt

    before = segments()
    with pytest.raises(KeyboardInterrupt):
        Snapshot.pack({"a": torch.randn(10), "b": torch.randn(10)}, progress=fail)
    assert segments() == before


def test_running_out_of_space_while_writing_leaves_nothing_behind(monkeypatch):
    # /dev/shm filling up between the free-space check and the copy (another process took it).
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd: int, data, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    before = segments()
    with pytest.raises(SnapshotError, match="could not write snapshot .* No space left on device; free space"):
        Snapshot.pack({"a": torch.randn(10), "b": torch.randn(10)})
    assert segments() == before


def test_a_read_error_while_loading_a_file_is_not_blamed_on_free_space(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"a": torch.randn(64), "b": torch.randn(64)}, str(path))

    def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "sendfile", sendfile)
    before = segments()
    with pytest.raises(SnapshotError, match="could not write snapshot .* Input/output error") as failure:
        Snapshot.load_safetensors(path)
    assert "free space" not in str(failure.value)
    assert segments() == before


def test_a_file_that_shrinks_while_it_is_loaded_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"a": torch.randn(64)}, str(path))
    monkeypatch.setattr(os, "sendfile", lambda out_fd, in_fd, offset, count: 0)  # end of file
    before = segments()
    with pytest.raises(SnapshotError, match="shrank while it was being read"):
        Snapshot.load_safetensors(path)
    assert segments() == before


# ---- memory


def test_weights_exist_once_after_the_caller_takes_views():
    # After a long test session the heap may hold free blocks large enough for these
    # tensors, and glibc keeps freed heap blocks in the process: the runtime gives
    # them back (packing.give_back_freed_memory) after taking views, and so does this.
    # The checksums are float32 sums, which make no copy that could stay resident.
    weights = {f"layer{index}.weight": torch.randn(50 * MiB // 4) for index in range(4)}
    total = 200 * MiB
    sums = {name: float(tensor.sum()) for name, tensor in weights.items()}
    anon_before = proc_status("RssAnon")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # too large to lock here
        snapshot = Snapshot.pack(weights)
    with snapshot:
        views = snapshot.tensors()
        for name in weights:
            weights[name] = views[name]  # what the runtime does with param.data
        del views
        give_back_freed_memory()
        assert {name: float(tensor.sum()) for name, tensor in weights.items()} == sums  # reads every page
        anon_after = proc_status("RssAnon")
        shmem_after = proc_status("RssShmem")
        assert anon_before - anon_after >= 0.9 * total, (anon_before, anon_after)
        assert shmem_after >= 0.9 * total
        del weights


@pytest.fixture
def memlock_limit():
    """Set the soft RLIMIT_MEMLOCK for one test and forget earlier warnings."""
    original = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def set_limit(soft: int) -> None:
        hard = original[1]
        if hard != resource.RLIM_INFINITY and soft > hard:
            pytest.skip(f"the hard RLIMIT_MEMLOCK ({hard} bytes) is below {soft}")
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))

    old_warned = snapshot_module.memlock_warned
    snapshot_module.memlock_warned = False
    yield set_limit
    snapshot_module.memlock_warned = old_warned
    resource.setrlimit(resource.RLIMIT_MEMLOCK, original)


def test_segment_is_locked_in_ram_within_the_limit(memlock_limit):
    memlock_limit(4 * MiB)
    locked_before = proc_status("VmLck")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snapshot = Snapshot.pack({"w": torch.randn(MiB // 4)})
    with snapshot:
        assert proc_status("VmLck") - locked_before >= MiB
    # Unmapped (no view is left) and so unlocked.
    gc.collect()
    assert proc_status("VmLck") == locked_before


def run_unprivileged(function, connection) -> None:
    # OpenMP's thread pool does not survive fork: a parallel torch op would hang here.
    torch.set_num_threads(1)
    if os.geteuid() == 0:
        os.setuid(65534)  # leaving root drops CAP_IPC_LOCK, which lifts RLIMIT_MEMLOCK
    try:
        connection.send(function())
    except BaseException as error:  # noqa: BLE001 - carried to the parent
        connection.send(error)


def in_child(function) -> object:
    """What `function` returns when run in a forked child that RLIMIT_MEMLOCK binds."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=run_unprivileged, args=(function, sender))
    child.start()
    answered = receiver.poll(120)
    result = receiver.recv() if answered else None
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    assert answered, "the child did not answer"
    if isinstance(result, BaseException):
        raise result
    return result


def pack_twice_over_the_limit() -> list[str]:
    """The warnings two packs larger than RLIMIT_MEMLOCK give, and whether they round-trip."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            weights = {"w": torch.randn(MiB)}
            with Snapshot.pack(weights) as snapshot:
                assert_same_tensors(weights, snapshot.tensors())
    return [f"{warning.category.__name__}: {warning.message}" for warning in caught]


def test_warns_once_when_the_limit_is_too_low(memlock_limit):
    memlock_limit(MiB)
    caught = in_child(pack_twice_over_the_limit)
    assert len(caught) == 1, caught
    assert re.search(r"RuntimeWarning: zerogpu: snapshot zerogpu-\d+-\w+ \(4(\.\d+)? MiB\) is not locked in RAM "
                     r"\(Cannot allocate memory\): RLIMIT_MEMLOCK allows 1 MiB.*ulimit -l unlimited", caught[0])


# ---- lifetime and naming


def test_segment_name_and_mode():
    with Snapshot.pack({"w": torch.randn(3)}) as snapshot:
        prefix = f"zerogpu-{os.getpid()}-"
        assert snapshot.name.startswith(prefix) and len(snapshot.name) > len(prefix) + 8
        assert os.stat(os.path.join(SHM_DIR, snapshot.name)).st_mode & 0o777 == 0o600


def test_close_unlinks_but_views_stay_valid():
    original = torch.randn(1000)
    snapshot = Snapshot.pack({"w": original})
    restored = snapshot.tensors()["w"]
    snapshot.close()
    assert snapshot.name not in segments()
    assert torch.equal(restored, original)  # still mapped: the view keeps the mapping
    snapshot.close()  # closing twice is harmless
    with pytest.raises(SnapshotError, match="closed"):
        snapshot.tensors()
    with pytest.raises(SnapshotError, match="no snapshot named"):
        Snapshot.attach(snapshot.name)


def test_collected_snapshot_unlinks_its_segment():
    snapshot = Snapshot.pack({"w": torch.randn(3)})
    name = snapshot.name
    del snapshot
    gc.collect()
    assert name not in segments()


@pytest.mark.slow
def test_segment_is_unlinked_at_interpreter_exit():
    result = run_python("import torch; from zerogpu.snapshot.snapshot import Snapshot\n"
                        "snapshot = Snapshot.pack({'w': torch.randn(10)})\n"
                        "import os; assert snapshot.name in os.listdir('/dev/shm')\n"
                        "print(snapshot.name)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("zerogpu-")
    assert result.stdout.strip() not in segments()


def test_pickled_snapshot_attaches_by_name():
    with Snapshot.pack(model_like()) as snapshot:
        with pickle.loads(pickle.dumps(snapshot)) as copy:
            assert copy.name == snapshot.name and copy.entries == snapshot.entries
            assert_same_tensors(snapshot.tensors(), copy.tensors())
        assert snapshot.name in segments()  # a copy that does not own it does not unlink it


def test_sweep_removes_segments_of_dead_owners():
    with Snapshot.pack({"mine": torch.randn(3)}) as mine:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a child that dies without cleaning up
            try:
                orphan = Snapshot.pack({"w": torch.randn(3)})
                os.write(write, orphan.name.encode())
            finally:
                os._exit(0)
        os.close(write)
        orphan_name = os.read(read, 100).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert orphan_name.startswith(f"zerogpu-{pid}-") and orphan_name in segments()
        removed = sweep()
        assert orphan_name in removed and mine.name not in removed
        assert orphan_name not in segments() and mine.name in segments()


# ---- other processes


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: storage_bytes(tensor).numpy().tobytes().hex() for name, tensor in tensors.items()}


def attach_in_child(name: str, inherited: Snapshot, queue) -> None:
    with Snapshot.attach(name) as attached:
        queue.put((checksums(attached.tensors()), checksums(inherited.tensors())))


def test_attach_from_a_forked_process():
    tensors = model_like()
    with Snapshot.pack(tensors) as snapshot:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=attach_in_child, args=(snapshot.name, snapshot, queue))
        child.start()
        by_name, inherited = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert by_name == inherited == checksums(tensors)


def test_an_unnamed_snapshot_is_shared_by_fork_and_never_in_dev_shm(monkeypatch):
    tensors = model_like()
    seen_while_writing = []
    write = snapshot_module.write_copies

    def watched(*args, **kwargs):
        seen_while_writing.append(segments())
        return write(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "write_copies", watched)
    before = segments()
    with Snapshot.pack(tensors, named=False) as snapshot:
        assert seen_while_writing == [before]  # not even while its bytes go in
        assert segments() == before
        with pytest.raises(SnapshotError, match="no snapshot named"):
            Snapshot.attach(snapshot.name)
        read, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(write_end, json.dumps(checksums(snapshot.tensors())).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read) as pipe:
            inherited = json.loads(pipe.read())
        os.waitpid(pid, 0)
        assert inherited == checksums(snapshot.tensors()) == checksums(tensors)
    assert segments() == before


def test_forked_child_leaving_does_not_unlink_the_parents_segment():
    with Snapshot.pack({"w": torch.randn(3)}) as snapshot:
        pid = os.fork()
        if pid == 0:
            try:  # everything a child does on its way out: close, collect, interpreter exit
                snapshot.close()
                gc.collect()
                atexit._run_exitfuncs()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert snapshot.name in segments()
        with Snapshot.attach(snapshot.name) as attached:
            assert torch.equal(attached.tensors()["w"], snapshot.tensors()["w"])


@pytest.mark.slow
def test_attach_from_a_spawned_process():
    tensors = model_like()
    code = ("import json, sys, torch\n"
            "from zerogpu.snapshot.snapshot import Snapshot\n"
            "with Snapshot.attach(sys.argv[1]) as snapshot:\n"
            "    views = snapshot.tensors()\n"
            "    print(json.dumps({name: torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())"
            ".numpy().tobytes().hex() for name, tensor in views.items()}))\n"
            "    print(views['embed.weight'].untyped_storage().data_ptr()"
            " == views['lm_head.weight'].untyped_storage().data_ptr())\n")
    with Snapshot.pack(tensors) as snapshot:
        result = run_python(code, snapshot.name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert json.loads(lines[0]) == checksums(tensors)
    assert lines[1] == "True"


def test_attached_segment_is_read_only():
    with Snapshot.pack({"w": torch.randn(1000)}) as snapshot:
        assert mapping_permissions(snapshot.address) == "rw-s"
        with Snapshot.attach(snapshot.name) as attached:
            assert mapping_permissions(attached.address) == "r--s"


# ---- bad input


@pytest.mark.parametrize("make, message", [
    (lambda: [torch.randn(3)], "mapping of names to tensors, not a list"),
    (lambda: {1: torch.randn(3)}, "names must be strings"),
    (lambda: {"w": [1.0, 2.0]}, "'w' is a list, not a torch.Tensor"),
    (lambda: {"ok": torch.randn(3), "w": torch.randn(3).numpy()}, "'w' is a ndarray"),
    (lambda: {"w": torch.randn(3, 3).to_sparse()}, "layout torch.sparse_coo.*to_dense"),
    (lambda: {"w": torch.randn(3, 3).to_sparse_csr()}, "layout torch.sparse_csr"),
    (lambda: {"w": torch.empty(3, device="meta")}, "meta tensor"),
    (lambda: {"w": torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)}, "quantized"),
    (lambda: {"w": torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])}, "nested tensor"),
    (lambda: {"w": torch.randn(3, dtype=torch.complex64).conj()}, "resolve_conj"),
], ids=["list", "key", "list-value", "ndarray", "sparse", "csr", "meta", "quantized", "nested", "conj"])
def test_pack_refuses_bad_input_before_making_anything(make, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on beta sparse, deprecated quantized and nested tensors
        tensors = make()
    before = segments()
    with pytest.raises(InvalidArgument, match=message):
        Snapshot.pack(tensors)
    assert segments() == before


def test_pack_refuses_more_than_dev_shm_has_free(tmp_path):
    stat = os.statvfs(SHM_DIR)
    size = stat.f_bavail * stat.f_frsize + 2**30
    huge = tmp_path / "huge"
    with open(huge, "wb") as file:
        file.truncate(size)  # a sparse file: no disk or memory is used
    with open(huge, "rb") as file:
        mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that the buffer is read-only
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    before = segments()
    with pytest.raises(InvalidArgument, match=r"needs .* of shared memory but /dev/shm has only .* free.*--shm-size"):
        Snapshot.pack({"small": torch.randn(3), "huge": tensor})
    assert segments() == before


@pytest.mark.gpu
def test_pack_refuses_tensors_on_a_gpu():
    with pytest.raises(InvalidArgument, match="data on cuda"):
        Snapshot.pack({"w": torch.randn(3, device="cuda")})


@pytest.mark.parametrize("name", ["", "weights", "/tmp/x", "zerogpu-abc-12", "zerogpu-1-xyz", 42, None])
def test_attach_refuses_names_that_are_not_snapshot_names(name):
    with pytest.raises(InvalidArgument, match="not a snapshot name"):
        Snapshot.attach(name)


def test_attach_of_an_unknown_name():
    with pytest.raises(SnapshotError, match="no snapshot named zerogpu-1-0123abcd"):
        Snapshot.attach("zerogpu-1-0123abcd")
    with pytest.raises(SnapshotError, match="no snapshot named"):
        Snapshot.attach("/zerogpu-1-0123abcd")


def damage(name: str, how: str) -> None:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        header = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        magic, version, checksum, manifest_length, data_offset, nbytes = header
        if how == "too short":
            os.ftruncate(fd, HEADER.size - 1)
        elif how == "truncated":
            os.ftruncate(fd, data_offset + nbytes - 1)
        elif how == "bad magic":
            os.pwrite(fd, b"NOTSNAP!", 0)
        elif how == "other version":
            os.pwrite(fd, HEADER.pack(magic, version + 1, checksum, manifest_length, data_offset, nbytes), 0)
        elif how == "corrupt manifest":
            byte = os.pread(fd, 1, HEADER.size + 10)
            os.pwrite(fd, bytes([byte[0] ^ 0x20]), HEADER.size + 10)
        else:  # a manifest with a sound checksum that lies
            columns = json.loads(os.pread(fd, manifest_length, HEADER.size))
            if how == "entry past the data":
                columns["nbytes"][0] = nbytes + 1
            elif how == "field missing":
                del columns["stride"]
            elif how == "fields of different lengths":
                columns["shape"].pop()
            elif how == "unknown dtype":
                columns["dtype"][0] = "float7"
            elif how == "negative stride":
                columns["stride"][0] = [-1]
            elif how == "a field that is not a list":
                columns["name"] = "wb"  # two one-letter names, were a string read as a list
            elif how == "a size torch cannot hold":
                columns["shape"][1], columns["stride"][1] = [1 << 70], [0]
            elif how == "elements torch cannot count":
                columns["shape"][1], columns["stride"][1] = [1 << 62, 4], [0, 0]
            manifest = json.dumps(columns).encode()
            if how == "nested too deep":
                manifest = b"[" * 2000 + b"]" * 2000  # deeper than the JSON reader recurses, in one page
            os.pwrite(fd, manifest, HEADER.size)
            os.pwrite(fd, HEADER.pack(magic, version, zlib.crc32(manifest), len(manifest), data_offset, nbytes), 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how, message", [
    ("too short", "too short to be a snapshot"),
    ("truncated", "truncated"),
    ("bad magic", "not a zerogpu snapshot"),
    ("other version", "format version 3; this zerogpu reads version 2"),
    ("corrupt manifest", "manifest .* is corrupt \\(checksum mismatch\\)"),
    ("entry past the data", "manifest .* is corrupt .*reaches past"),
    ("field missing", "manifest .* is corrupt .*its fields are"),
    ("fields of different lengths", "manifest .* is corrupt .*different numbers of entries"),
    ("unknown dtype", "manifest .* is corrupt .*float7"),
    ("negative stride", "manifest .* is corrupt .*malformed"),
    ("a field that is not a list", "manifest .* is corrupt .*not a list"),
    ("a size torch cannot hold", "manifest .* is corrupt .*malformed"),
    ("elements torch cannot count", "manifest .* is corrupt .*malformed"),
    ("nested too deep", "manifest .* is corrupt"),
])
def test_attach_refuses_a_damaged_segment(how, message):
    with Snapshot.pack({"w": torch.randn(100), "b": torch.randn(3)}) as snapshot:
        damage(snapshot.name, how)
        with pytest.raises(SnapshotError, match=message):
            Snapshot.attach(snapshot.name)


@pytest.mark.parametrize("buffer", [
    torch.zeros(10, dtype=torch.uint8),
    torch.zeros(1024, dtype=torch.float32),
    torch.zeros(2, 2048, dtype=torch.uint8),
    torch.zeros(8192, dtype=torch.uint8)[::2],
    bytearray(4096),
    torch.zeros(4096, dtype=torch.uint8, device="meta"),
], ids=["short", "float", "2-d", "strided", "bytearray", "meta"])
def test_views_refuses_a_buffer_of_the_wrong_kind(buffer):
    with Snapshot.pack({"w": torch.randn(1024)}) as snapshot:
        assert snapshot.nbytes == 4096
        with pytest.raises(InvalidArgument, match="contiguous 1-D torch.uint8 tensor of 4096 bytes"):
            snapshot.views(buffer)


# ---- safetensors


def test_load_safetensors(tmp_path):
    torch.manual_seed(1)
    tensors = {"embed": torch.randn(50, 8), "norm": torch.randn(8).to(torch.bfloat16), "ids": torch.arange(7),
               "mask": torch.rand(5) > 0.5, "half": torch.randn(3, 3).half(), "fp8": torch.randn(4).to(torch.float8_e4m3fn),
               "scalar": torch.tensor(3.0), "empty": torch.empty(0, 2), "c": torch.randn(2, dtype=torch.complex64),
               "u16": torch.arange(6).to(torch.uint16)}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    reports: list[int] = []
    with Snapshot.load_safetensors(path, progress=reports.append) as snapshot:
        restored = snapshot.tensors()
        assert sorted(restored) == sorted(tensors)
        for name, tensor in tensors.items():
            assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
            assert torch.equal(storage_bytes(restored[name]), storage_bytes(tensor)), name
        assert sum(reports) == sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        for entry in snapshot.entries:
            assert entry.offset % 256 == 0


def test_save_safetensors_reads_back_equal(tmp_path):
    tensors = model_like()
    path = tmp_path / "model.safetensors"
    with Snapshot.pack(tensors) as snapshot:
        snapshot.save_safetensors(path)
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(element_bytes(loaded[name]), element_bytes(tensor)), name
    with safetensors.safe_open(path, "pt") as file:
        assert file.metadata() == {"format": "pt"}
    # and back into a snapshot
    with Snapshot.load_safetensors(path) as again:
        for name, tensor in again.tensors().items():
            assert torch.equal(element_bytes(tensor), element_bytes(tensors[name])), name


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch has no float4")
def test_float4_pairs_through_safetensors(tmp_path):
    packed = torch.randint(0, 256, (3, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "fp4.safetensors"
    with Snapshot.pack({"w": packed}) as snapshot:
        snapshot.save_safetensors(path)
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        assert json.loads(file.read(length))["w"]["shape"] == [3, 8]  # safetensors counts 4-bit values
    assert torch.equal(safetensors.torch.load_file(path)["w"].view(torch.uint8), packed.view(torch.uint8))
    with Snapshot.load_safetensors(path) as snapshot:
        restored = snapshot.tensors()["w"]
        assert restored.shape == (3, 4) and torch.equal(restored.view(torch.uint8), packed.view(torch.uint8))


@pytest.mark.slow
def test_load_safetensors_makes_no_intermediate_copy(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({f"w{index}": torch.randn(8 * MiB // 4) for index in range(16)}, path)  # 128 MiB
    code = ("import resource, sys, warnings\n"
            "from zerogpu.snapshot.snapshot import Snapshot\n"
            "resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))\n"
            "warnings.simplefilter('ignore', RuntimeWarning)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with Snapshot.load_safetensors(sys.argv[1]) as snapshot:\n"
            "    assert snapshot.nbytes >= 128 * 2**20\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    result = run_python(code, str(path))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) * 1024 < 16 * MiB  # peak resident memory grew by less than an eighth of the file


def write_safetensors(path, header: object, data: bytes = b"") -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize("kind, message", [
    ("missing", "cannot read"),
    ("short", "only 3 bytes long"),
    ("header past the end", "header claims"),
    ("not json", "not valid JSON"),
    ("not an object", "not a JSON object"),
    ("malformed entry", "'w' is malformed"),
    ("unknown dtype", "dtype 'F6_E2M3'"),
    ("wrong size", "needs 16 bytes but its offsets"),
    ("truncated data", "corrupt or truncated"),
    ("odd fp4", "last dimension must be even"),
])
def test_load_safetensors_refuses_bad_files(tmp_path, kind, message):
    path = tmp_path / "bad.safetensors"
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if kind == "short":
        path.write_bytes(b"abc")
    elif kind == "header past the end":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif kind == "not json":
        write_safetensors(path, b"{not json")
    elif kind == "not an object":
        write_safetensors(path, [1, 2])
    elif kind == "malformed entry":
        write_safetensors(path, {"w": {"dtype": "F32", "shape": "4"}}, bytes(16))
    elif kind == "unknown dtype":
        write_safetensors(path, {"w": {**entry, "dtype": "F6_E2M3"}}, bytes(16))
    elif kind == "wrong size":
        write_safetensors(path, {"w": {**entry, "data_offsets": [0, 12]}}, bytes(16))
    elif kind == "truncated data":
        write_safetensors(path, {"w": entry}, bytes(12))
    elif kind == "odd fp4":
        write_safetensors(path, {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2))
    before = segments()
    with pytest.raises(InvalidArgument, match=message):
        Snapshot.load_safetensors(path)
    assert segments() == before


@pytest.mark.parametrize("tensors, message", [
    ({"ok": torch.randn(2), "w": torch.randn(2, dtype=torch.complex128)},
     "'w' is torch.complex128, which safetensors cannot store"),
    ({"ok": torch.randn(2), "__metadata__": torch.randn(2)}, "named '__metadata__' cannot be saved"),
], ids=["complex128", "metadata-name"])
def test_save_safetensors_refuses_what_the_format_cannot_hold(tmp_path, tensors, message):
    path = tmp_path / "out.safetensors"
    with Snapshot.pack(tensors) as snapshot:
        with pytest.raises(InvalidArgument, match=message):
            snapshot.save_safetensors(path)
    assert list(tmp_path.iterdir()) == []
