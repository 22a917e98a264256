"""`zerogpu bench`: the whole pipeline on this machine, against the obvious alternatives.

One run builds a model of the size asked for (square float32 linear layers,
each followed by tanh, seeded), writes it to two files in a temporary folder,
and measures in this order:

1. zerogpu through its real entry points: `zerogpu.enable()`, the model moved
   to 'cuda', `zerogpu.startup()` (the pack), and a `@zerogpu.GPU` function
   that runs the model on a small batch. Cold calls fork a worker that
   attaches the device, restores the weights, runs and returns; warm calls
   reuse a worker kept idle (ZEROGPU_IDLE_TIMEOUT). Each timed call is driven
   as the decorator drives it, through `call.Call`, so its phases can be read.
2. The copy engine's strategies, each restoring the same weights from a
   snapshot into one device buffer (`engine.Engine`).
3. The same work done without zerogpu, in this process: the function with the
   model already on the device; the model moved there per call from ordinary
   memory (`model.to(device)`); loaded per call with
   `safetensors.torch.load_file`; and read per call from a file on disk
   through two buffers, as the disk-backed loader of ZeroGPU's `spaces`
   package does (`BufferedFileLoader`).

zerogpu is measured first because the alternatives open a CUDA context in
this process, after which it must not fork workers (on the emulated backend
the order is kept the same). The pipeline runs on the GPU when one is visible
and on the emulated backend otherwise; there the "device" is host memory, so
moving or loading the model onto it is a copy into fresh memory: the work a
GPU copy does, less the bus. Every output is checked against zerogpu's.

Sizes are binary (1GB = 1GiB = 2**30 bytes), as in benchmarks/*.py;
throughput is in GB/s of 10**9 bytes per second.
"""

from __future__ import annotations

import datetime
import gc
import math
import mmap
import os
import platform
import queue
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.table import Table
from safetensors.torch import load_file, save_file

from .snapshot import segments
from . import units
from .units import describe_size
from .errors import InvalidArgument

MiB = 2**20
MIN_SIZE = MiB
DEFAULT_SIZE = "1GB"  # a model a laptop holds twice over
DEFAULT_REPEAT = 3
WIDTH = 2048  # layer width: 16 MiB of weights per layer, as in a mid-sized transformer
BATCH = 8  # rows of the input each call runs
SEED = 0
PAGE = os.sysconf("SC_PAGE_SIZE")
# The `spaces` loader reads through two pinned buffers of 128 MiB.
BUFFER_BYTES = 128 * MiB
BUFFER_COUNT = 2
# Host memory held at once, in copies of the weights: the model and its snapshot
# while it is packed; later the snapshot (or the weights in ordinary memory) and
# the copy one call restores or loads, which is host memory on the emulated
# backend and device memory on a GPU. Plus the read buffers.
HOST_COPIES = 2
CALL_DURATION = 600.0  # seconds each bench call may take: a large model on a slow machine
BENCH_QUOTA = 1e9  # GPU seconds the bench's private ledger allows: never the limit
WARM_IDLE = 600.0  # seconds a warm worker waits for the next call while the bench runs
# Outputs this close count as the same: kernels may sum in another order on another device.
RTOL, ATOL = 1e-4, 1e-6

PHASES = ("queue", "fork", "attach", "restore", "run", "return", "release")
ALTERNATIVES = {
    "in_process": "in-process, model in place",
    "to_device": "model.to(device) per call",
    "load_file": "load_file per call",
    "buffered_file": "spaces' double buffer",
}


# -- arguments ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """The model size asked for: '64MB', '1GB', '1.5GiB', '512MiB' (binary units, see zerogpu.units)."""
    size = units.parse_size(text, "--size")
    if size < MIN_SIZE:
        raise InvalidArgument(f"--size {text} is below the smallest model the bench builds, 1MB: ask for more")
    return size


@dataclass(frozen=True)
class Plan:
    """What one run will do, checked before anything is allocated."""

    layers: int
    width: int
    repeat: int
    backend: str
    device_name: str
    workdir: Path
    json_path: Path | None

    @property
    def nbytes(self) -> int:
        return self.layers * layer_bytes(self.width)


def layer_bytes(width: int) -> int:
    return (width * width + width) * 4


def model_shape(size: int) -> tuple[int, int]:
    """Layers and width of the model nearest `size` bytes; narrower layers for small sizes."""
    width = WIDTH
    while width > 64 and layer_bytes(width) > size:
        width //= 2
    return max(1, round(size / layer_bytes(width))), width


def parse_repeat(text: str | int) -> int:
    try:
        repeat = int(text)
    except ValueError:
        raise InvalidArgument(f"--repeat {text!r} is not a whole number: write e.g. --repeat 3") from None
    if repeat < 1:
        raise InvalidArgument(f"--repeat {repeat} must be a whole number of at least 1")
    return repeat


def plan(size: str, repeat: str | int, json_path: str | os.PathLike | None = None) -> Plan:
    """Check the arguments and this machine's room for them; InvalidArgument says what is wrong."""
    from .cuda import devices
    from . import runtime

    nbytes = parse_size(size)
    repeat = parse_repeat(repeat)
    target = Path(json_path) if json_path is not None else None
    if target is not None:
        if not target.parent.is_dir():
            raise InvalidArgument(f"--json {json_path}: the folder {target.parent} does not exist")
        if target.is_dir() or not os.access(target.parent, os.W_OK):
            raise InvalidArgument(f"--json {json_path}: cannot write a file there; name a file in a writable folder")
    layers, width = model_shape(nbytes)
    nbytes = layers * layer_bytes(width)
    backend = runtime.choose_backend()
    device = devices.discover(backend)[0]

    host = HOST_COPIES * nbytes + BUFFER_COUNT * BUFFER_BYTES
    available = psutil.virtual_memory().available
    if host > available:
        raise InvalidArgument(
            f"--size {size} needs about {describe_size(host)} of free memory ({HOST_COPIES} copies of the weights and "
            f"the read buffers) but {describe_size(available)} is available: ask for a smaller size"
        )
    shm_free, _ = segments.free_space()
    if nbytes + PAGE > shm_free:
        raise InvalidArgument(
            f"--size {size} needs {describe_size(nbytes)} of shared memory for the snapshot but /dev/shm has "
            f"{describe_size(shm_free)} free: ask for a smaller size or make /dev/shm larger"
        )
    workdir = Path(tempfile.gettempdir())
    disk_free = shutil.disk_usage(workdir).free
    if 2 * nbytes > disk_free:
        raise InvalidArgument(
            f"--size {size} needs {describe_size(2 * nbytes)} in {workdir} for the model's files but {describe_size(disk_free)} "
            "is free: ask for a smaller size or point TMPDIR elsewhere"
        )
    if backend == "cuda" and device.total_memory and nbytes >= device.total_memory:
        raise InvalidArgument(
            f"--size {size} does not fit on {device.name} ({describe_size(device.total_memory)}): ask for a smaller size"
        )
    return Plan(layers, width, repeat, backend, device.name, workdir, target)


# -- the model ---------------------------------------------------------------------------


class Stack(torch.nn.Module):
    """The bench's model: square linear layers, each followed by tanh to keep values bounded."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build_model(layers: int, width: int) -> Stack:
    """A seeded model in host memory, initialised as torch.nn.Linear does (uniform in ±1/sqrt(width))."""
    with torch.device("meta"):
        model = Stack(layers, width)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(SEED)
    bound = 1 / math.sqrt(width)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-bound, bound, generator=generator)
    return model.eval()


def skeleton(layers: int, width: int) -> Stack:
    """The model without weights, to run with weights from anywhere (torch.func.functional_call)."""
    with torch.device("meta"):
        return Stack(layers, width).eval()


def run_with(model: Stack, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's output for `x` with `weights`, back in host memory (which waits for the device)."""
    device = next(iter(weights.values())).device
    with torch.inference_mode():
        return torch.func.functional_call(model, weights, (x.to(device),)).cpu()


def compare(output: torch.Tensor, reference: torch.Tensor) -> str:
    """'identical', 'close (max diff ...)' or 'DIFFERENT (...)'."""
    if torch.equal(output, reference):
        return "identical"
    diff = (output - reference).abs().max().item()
    if torch.allclose(output, reference, rtol=RTOL, atol=ATOL):
        return f"close (max diff {diff:.1e})"
    return f"DIFFERENT (max diff {diff:.1e})"


# -- the double-buffered loader ------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """Where one tensor's bytes are in the loader's file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class BufferedFileLoader:
    """Weights in a file on disk, read back per call through two buffers while copying to the device.

    This is how ZeroGPU's `spaces` package loads a model into each GPU
    worker (its own code is not used here): each tensor is written to the
    file page-aligned once; a load reads the file in 128 MiB pieces into one
    buffer (with O_DIRECT, bypassing the page cache, where the filesystem
    allows it) while the other buffer's piece is copied to the device. The
    buffers are pinned on a GPU and are made once, not per load, which favours
    this loader a little.
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], backend: str) -> None:
        self.path = path
        self.entries: list[FileEntry] = []
        offset = 0
        with open(path, "wb") as file:
            for name, tensor in tensors.items():
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                file.seek(offset)
                file.write(data.numpy())
                self.entries.append(FileEntry(name, tensor.dtype, tuple(tensor.shape), offset, data.numel()))
                offset = round_up(offset + data.numel(), PAGE)
            # O_DIRECT reads whole pages, so the file ends on one.
            file.truncate(offset)
        self.nbytes = offset
        self.backend = backend
        self.buffers: list[torch.Tensor] = []
        self.direct = False

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Read every tensor into new device memory; returns them by name."""
        if not self.buffers:
            self.buffers = [self._buffer() for _ in range(BUFFER_COUNT)]
        aligned = all(buffer.data_ptr() % PAGE == 0 for buffer in self.buffers)
        fd, self.direct = open_for_reading(self.path, direct=aligned)
        free: queue.Queue = queue.Queue()
        filled: queue.Queue = queue.Queue()
        for buffer in self.buffers:
            free.put(buffer)
        reader = threading.Thread(target=self._read, args=(fd, free, filled), name="bench-reader", daemon=True)
        destinations = {entry.name: torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
                        for entry in self.entries}
        reader.start()
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                buffer, start, length = item
                self._copy_out(buffer, start, length, destinations)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()  # the buffer is read again next
                free.put(buffer)
        finally:
            for _ in self.buffers:
                free.put(None)  # stops a reader still waiting for a buffer
            reader.join()
            os.close(fd)
        return {entry.name: destinations[entry.name].view(entry.dtype).view(entry.shape) for entry in self.entries}

    def _buffer(self) -> torch.Tensor:
        if self.backend == "cuda":
            return torch.empty(BUFFER_BYTES, dtype=torch.uint8, pin_memory=True)
        # An anonymous mapping starts on a page, as O_DIRECT needs.
        return torch.frombuffer(mmap.mmap(-1, BUFFER_BYTES), dtype=torch.uint8)

    def _read(self, fd: int, free: queue.Queue, filled: queue.Queue) -> None:
        try:
            for start in range(0, self.nbytes, BUFFER_BYTES):
                buffer = free.get()
                if buffer is None:
                    return
                length = min(BUFFER_BYTES, self.nbytes - start)
                read_exactly(fd, memoryview(buffer.numpy())[:length], start)
                filled.put((buffer, start, length))
        except BaseException as error:  # noqa: BLE001 - raised again by the copying thread
            filled.put(error)
            return
        filled.put(None)

    def _copy_out(self, buffer: torch.Tensor, start: int, length: int,
                  destinations: dict[str, torch.Tensor]) -> None:
        end = start + length
        for entry in self.entries:
            low, high = max(entry.offset, start), min(entry.offset + entry.nbytes, end)
            if low < high:
                target = destinations[entry.name][low - entry.offset:high - entry.offset]
                target.copy_(buffer[low - start:high - start], non_blocking=True)


def open_for_reading(path: Path, *, direct: bool) -> tuple[int, bool]:
    """A descriptor for reading `path`, with O_DIRECT when asked and the filesystem takes it."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: read through the page cache
    return os.open(path, os.O_RDONLY), False


def read_exactly(fd: int, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count == 0:
            raise EOFError(f"the bench's weight file ended {len(target) - done} bytes early")
        done += count


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# -- measuring ---------------------------------------------------------------------------


def median_of(samples: list[float]) -> dict[str, Any]:
    return {"seconds": samples, "median": statistics.median(samples)}


@contextmanager
def interrupt_once() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; later ones are ignored so that the cleanup can finish."""
    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the block (the runtime reads its settings from there)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def timed_call(function: Callable, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """One call of a decorated function, driven as the decorator does, with its phases.

    `total` is what the caller waits; the phases are the call's own (see
    Call.phases; `release` is the reaping of the worker, or its parking, and
    the lease's release); `other` whatever they leave (pickling the
    arguments, messages in flight).
    """
    from .call.call import Call

    started = time.perf_counter()
    call = Call(function.zerogpu, (x,), {})
    call.start()
    messages = call.messages()
    result = returned = None
    try:
        for verb, value in messages:
            if verb == "return":
                result, returned = value, time.perf_counter()
                break
    finally:
        messages.close()  # ends the call
    ended = time.perf_counter()
    if returned is None:
        raise AssertionError("a call ended without a result")  # pragma: no cover - Call raises instead
    phases = {name: call.phases[name] for name in PHASES if name in call.phases}
    phases["other"] = (ended - started) - sum(phases.values())
    # A warm call is served by a worker that was already running: it has no fork.
    figures: dict[str, Any] = {"total": ended - started, "warm": "fork" not in phases, "phases": phases}
    stats = call.phases.get("restore_stats")
    if stats:
        figures["restore_stats"] = stats
    return result, figures


def summarize_calls(calls: list[dict[str, Any]], reference: torch.Tensor, outputs: list[torch.Tensor],
                    nbytes: int) -> dict[str, Any]:
    summary = median_of([call["total"] for call in calls])
    summary["phases"] = {name: median_of([call["phases"][name] for call in calls])
                         for name in calls[0]["phases"]}
    if "restore" in summary["phases"]:
        summary["restore_gbps"] = nbytes / summary["phases"]["restore"]["median"] / 1e9
        summary["restore_strategy"] = calls[0]["restore_stats"][0]["strategy"]
        summary["restore_stats"] = [call["restore_stats"] for call in calls]
    summary["warm"] = [call["warm"] for call in calls]
    summary["output"] = worst([compare(output, reference) for output in outputs])
    return summary


def worst(verdicts: list[str]) -> str:
    """The verdict to show for several outputs: any difference, else any inexactness."""
    for prefix in ("DIFFERENT", "close"):
        for verdict in verdicts:
            if verdict.startswith(prefix):
                return verdict
    return verdicts[0]


def measure_zerogpu(plan: Plan, model: Stack, x: torch.Tensor, ledger: Path,
                    say: Callable[[str], None]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pack, cold calls and warm calls through the runtime; leaves zerogpu disabled again."""
    import zerogpu

    from .cuda import devices
    from . import runtime
    from .schedule.policy import Policy
    from .schedule.quota import QuotaLedger
    from .schedule.scheduler import EmbeddedScheduler, use_scheduler

    # The decorator keeps the functions it decorated for the life of the process; holding
    # the model through this dict, emptied below, lets its snapshot go when the bench is done.
    held: dict[str, Stack] = {}
    zerogpu.enable()
    try:
        # A private ledger with room to spare: the bench must not spend the user's quota.
        policy = Policy(daily_quota={"anonymous": BENCH_QUOTA})
        use_scheduler(EmbeddedScheduler(devices.discover(runtime.backend()),
                                        ledger=QuotaLedger(ledger, policy=policy)))
        model.to("cuda")
        held["model"] = model

        @zerogpu.GPU(duration=CALL_DURATION, size="xlarge")
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return held["model"](x.to("cuda")).cpu()

        say("zerogpu: packing the weights into shared memory")
        started = time.perf_counter()
        packed = zerogpu.startup(progress=lambda nbytes: None)  # no bar: the bench times the pack itself
        pack = median_of([time.perf_counter() - started])
        pack["bytes"] = packed
        pack["gbps"] = packed / pack["median"] / 1e9

        cold, cold_outputs = [], []
        # Cold calls need workers that exit after their call, whatever the environment says.
        with environment("ZEROGPU_IDLE_TIMEOUT", "0"):
            say("zerogpu: a first call through the decorated function (not timed)")
            reference = forward(x)
            for i in range(plan.repeat):
                say(f"zerogpu: cold call {i + 1}/{plan.repeat}")
                output, figures = timed_call(forward, x)
                cold.append(figures)
                cold_outputs.append(output)
        warm, warm_outputs = [], []
        with environment("ZEROGPU_IDLE_TIMEOUT", str(WARM_IDLE)):
            say("zerogpu: a call that leaves its worker warm (not timed)")
            forward(x)
            for i in range(plan.repeat):
                say(f"zerogpu: warm call {i + 1}/{plan.repeat}")
                output, figures = timed_call(forward, x)
                warm.append(figures)
                warm_outputs.append(output)
    finally:
        runtime.disable()
        held.clear()
    return reference, {
        "pack": pack,
        "cold_call": summarize_calls(cold, reference, cold_outputs, packed),
        "warm_call": summarize_calls(warm, reference, warm_outputs, packed),
    }


def measure_strategies(plan: Plan, weights_file: Path, shape: Stack, x: torch.Tensor, reference: torch.Tensor,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """Each copy-engine strategy restoring the same snapshot into one device buffer."""
    from .cuda.engine import STRATEGIES, Engine
    from .snapshot.snapshot import Snapshot

    seconds: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
    verdicts: dict[str, str] = {}
    with Snapshot.load_safetensors(weights_file) as snapshot, Engine(plan.backend) as engine:
        buffer = engine.alloc_buffer(snapshot.nbytes)
        for i in range(plan.repeat):
            for strategy in STRATEGIES:
                say(f"copy engine: {strategy} restore {i + 1}/{plan.repeat}")
                if i == 0:
                    # Start from zeros, so the output check sees this strategy's copy.
                    buffer.zero_()
                    if plan.backend == "cuda":
                        torch.cuda.synchronize()
                stats = engine.restore(snapshot.address, buffer.data_ptr(), snapshot.nbytes, strategy=strategy)
                seconds[strategy].append(stats.seconds)
                if i == 0:
                    verdicts[strategy] = compare(run_with(shape, snapshot.views(buffer), x), reference)
        nbytes = snapshot.nbytes
        del buffer
    results = {}
    for strategy in STRATEGIES:
        results[strategy] = median_of(seconds[strategy])
        results[strategy]["gbps"] = nbytes / results[strategy]["median"] / 1e9
        results[strategy]["output"] = verdicts[strategy]
    return results


def measure_alternatives(plan: Plan, weights_file: Path, loader: BufferedFileLoader, shape: Stack,
                         x: torch.Tensor, reference: torch.Tensor,
                         say: Callable[[str], None]) -> dict[str, Any]:
    """The same calls without zerogpu, in this process; per-call loaders take turns each round."""
    device = torch.device("cuda" if plan.backend == "cuda" else "cpu")
    # The model in ordinary (pageable, private) memory, as an app holds it.
    ordinary = {name: tensor.clone() for name, tensor in load_file(weights_file).items()}

    def to_device() -> dict[str, torch.Tensor]:
        return {name: tensor.to(device, copy=True) for name, tensor in ordinary.items()}

    def from_file() -> dict[str, torch.Tensor]:
        if device.type == "cuda":
            return load_file(weights_file, device=str(device))
        # On the CPU load_file maps the file and copies nothing; the device copy is the clone.
        return {name: tensor.clone() for name, tensor in load_file(weights_file).items()}

    per_call = {"to_device": to_device, "load_file": from_file, "buffered_file": lambda: loader.load(device)}
    seconds: dict[str, list[float]] = {name: [] for name in ALTERNATIVES}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in ALTERNATIVES}
    for i in range(plan.repeat):
        for name, load in per_call.items():
            say(f"alternatives: {ALTERNATIVES[name]} {i + 1}/{plan.repeat}")
            started = time.perf_counter()
            weights = load()
            output = run_with(shape, weights, x)
            seconds[name].append(time.perf_counter() - started)
            outputs[name].append(output)
            del weights
    # Last, so that no per-call copy shares the device with it.
    resident = ordinary if device.type == "cpu" else {name: t.to(device) for name, t in ordinary.items()}
    for i in range(plan.repeat):
        say(f"alternatives: {ALTERNATIVES['in_process']} {i + 1}/{plan.repeat}")
        started = time.perf_counter()
        output = run_with(shape, resident, x)
        seconds["in_process"].append(time.perf_counter() - started)
        outputs["in_process"].append(output)
    results = {}
    for name, label in ALTERNATIVES.items():
        results[name] = median_of(seconds[name])
        results[name]["label"] = label
        results[name]["output"] = worst([compare(output, reference) for output in outputs[name]])
    results["buffered_file"]["o_direct"] = loader.direct
    results["buffered_file"]["buffers"] = [BUFFER_COUNT, BUFFER_BYTES]
    return results


def run(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Measure everything `plan` says; returns the report (see `render` and the JSON file).

    Leaves nothing behind on any path, Ctrl-C included: no worker, no
    shared-memory segment, no file.
    """
    workdir = Path(tempfile.mkdtemp(prefix="zerogpu-bench-", dir=plan.workdir))
    try:
        say(f"building a {describe_size(plan.nbytes)} model: {plan.layers} layers of {plan.width} x {plan.width} float32")
        model = build_model(plan.layers, plan.width)
        shape = skeleton(plan.layers, plan.width)
        x = torch.randn(BATCH, plan.width, generator=torch.Generator().manual_seed(SEED + 1))
        say(f"writing the weights to {workdir} for the file-based loaders")
        weights_file = workdir / "model.safetensors"
        save_file(model.state_dict(), weights_file)
        loader = BufferedFileLoader(workdir / "model.bin", model.state_dict(), plan.backend)

        reference, measured = measure_zerogpu(plan, model, x, workdir / "quota.sqlite", say)
        del model
        gc.collect()  # the snapshot's memory goes with the last tensor that viewed it
        strategies = measure_strategies(plan, weights_file, shape, x, reference, say)
        alternatives = measure_alternatives(plan, weights_file, loader, shape, x, reference, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    cold, warm = measured["cold_call"]["median"], measured["warm_call"]["median"]
    for result in alternatives.values():
        result["ratio_to_cold"] = result["median"] / cold
        result["ratio_to_warm"] = result["median"] / warm
    return {
        "zerogpu": package_version("zerogpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": plan.backend,
        "device": plan.device_name,
        "machine": machine(),
        "model": {"bytes": plan.nbytes, "layers": plan.layers, "width": plan.width, "dtype": "float32",
                  "tensors": 2 * plan.layers, "batch": BATCH},
        "repeat": plan.repeat,
        **measured,
        "restore_strategies": strategies,
        "alternatives": alternatives,
    }


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def passed(report: dict[str, Any]) -> bool:
    """Whether every path gave zerogpu's output."""
    verdicts = [report["cold_call"]["output"], report["warm_call"]["output"]]
    verdicts += [result["output"] for result in report["restore_strategies"].values()]
    verdicts += [result["output"] for result in report["alternatives"].values()]
    return not any(verdict.startswith("DIFFERENT") for verdict in verdicts)


# -- the table ---------------------------------------------------------------------------


def render(report: dict[str, Any]) -> Table:
    """One table of every figure; medians over the repeats."""
    backend = report["backend"]
    where = (f"GPU: {report['device']}" if backend == "cuda"
             else "emulated backend, no GPU: host memory stands in for device memory")
    model = report["model"]
    table = Table(
        title=f"zerogpu bench, {where}\n{describe_size(model['bytes'])} model ({model['layers']} layers of "
              f"{model['width']} x {model['width']} float32), batch {model['batch']}, "
              f"median of {report['repeat']}",
        caption="copy engine: restores into a device buffer allocated once.\n"
                "/ cold: the time as a ratio to zerogpu's cold call. "
                "output: compared with zerogpu's first call.",
    )
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("/ cold", justify="right")
    table.add_column("output")

    pack = report["pack"]
    table.add_row("zerogpu pack (once)", seconds(pack["median"]), rate(pack["gbps"]), "", "")
    for key, label in (("cold_call", "zerogpu cold call"), ("warm_call", "zerogpu warm call")):
        call = report[key]
        table.add_row(label, seconds(call["median"]), "", "1.00" if key == "cold_call" else
                      ratio(call["median"] / report["cold_call"]["median"]), call["output"], style="bold")
        for phase, figures in call["phases"].items():
            name = f"  {phase}" + (f" ({call['restore_strategy']})" if phase == "restore" else "")
            speed = rate(call["restore_gbps"]) if phase == "restore" else ""
            table.add_row(name, seconds(figures["median"]), speed, "", "", style="dim")
    table.add_section()
    for strategy, figures in report["restore_strategies"].items():
        table.add_row(f"copy engine: {strategy}", seconds(figures["median"]), rate(figures["gbps"]), "",
                      figures["output"])
    table.add_section()
    for figures in report["alternatives"].values():
        label = figures["label"]
        if "o_direct" in figures:
            label += " (O_DIRECT)" if figures["o_direct"] else " (page cache)"
        table.add_row(label, seconds(figures["median"]), "", ratio(figures["ratio_to_cold"]), figures["output"])
    return table


def seconds(value: float) -> str:
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def rate(gbps: float) -> str:
    return f"{gbps:.2f}"


def ratio(value: float) -> str:
    return f"{value:.2f}"
