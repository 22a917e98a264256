"""The copy engine: a snapshot's bytes into one device buffer, fast.

A restore is one bulk host-to-device copy of one contiguous region, cut into
chunks and pipelined by one of three strategies:

- ``pageable``: synchronous copies straight from the snapshot's (pageable) memory;
- ``register``: page-lock chunks of the snapshot in place and copy them
  asynchronously, registering the next chunks while the DMA engine copies;
- ``staging``: worker threads memcpy chunks into a pinned ring that the DMA
  engine drains.

The work is done by the compiled module ``zerogpu.cuda._ext._engine`` on either of
two backends behind one table of functions: the CUDA driver (libcuda.so.1,
loaded at run time) or a CPU emulation whose "device memory" is host memory.
The emulated driver can inject faults (see `EmulatedFaults`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy
import torch

from .. import settings
from ..settings import BACKENDS
from ._ext import _engine
from ..errors import CudaError, CudaUnavailable, InvalidArgument

__all__ = [
    "STRATEGIES",
    "BACKENDS",
    "Tuning",
    "RestoreStats",
    "EmulatedFaults",
    "Engine",
    "restore_snapshot",
    "driver_info",
    "set_emulated_faults",
    "emulated_resources",
]

STRATEGIES = ("pageable", "register", "staging")
DRIVER_LIBRARY = "libcuda.so.1"
MAX_STREAMS = 64
MAX_THREADS = 256
MiB = 1 << 20


@dataclass(frozen=True)
class Tuning:
    """How a restore is cut up: chunk size, and how many streams and threads work on it."""

    chunk_bytes: int
    streams: int
    threads: int


# Defaults per backend and strategy. The emulated ones were measured by
# benchmarks/bench_restore.py (see benchmarks/RESULTS.md); the CUDA ones are
# starting points for an H100 that the GPU run of the same benchmark checks.
DEFAULT_STRATEGY = {"emulated": "pageable", "cuda": "staging"}
DEFAULT_TUNING: dict[tuple[str, str], Tuning] = {
    ("emulated", "pageable"): Tuning(chunk_bytes=64 * MiB, streams=1, threads=1),
    ("emulated", "register"): Tuning(chunk_bytes=64 * MiB, streams=1, threads=1),
    ("emulated", "staging"): Tuning(chunk_bytes=8 * MiB, streams=1, threads=1),
    ("cuda", "pageable"): Tuning(chunk_bytes=64 * MiB, streams=1, threads=1),
    ("cuda", "register"): Tuning(chunk_bytes=256 * MiB, streams=2, threads=2),
    # A ring of threads x 2 chunks, pinned by each worker: 64 MiB, not the 256 MiB of 8 threads x 16 MiB.
    ("cuda", "staging"): Tuning(chunk_bytes=8 * MiB, streams=2, threads=4),
}


@dataclass
class RestoreStats:
    """What one restore did and how long it took."""

    strategy: str
    nbytes: int
    seconds: float
    # In cuMemHostRegister/cuMemHostUnregister, summed over threads (0 unless "register").
    register_seconds: float
    # Creating streams or the pinned staging ring in this call (0 when the engine reused them).
    setup_seconds: float
    chunk_bytes: int
    streams: int
    threads: int

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10**9 bytes per second)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class EmulatedFaults:
    """Faults the emulated driver injects; None leaves one off.

    Written as text (ZEROGPU_EMULATED_FAULTS) as comma-separated names, each
    with an optional ``=N`` (a bare name means 0):
    ``fail_after_bytes=1048576,fail_alloc,fail_register=2,hang_after_bytes=0``.
    """

    # Host-to-device copies succeed for N bytes in total, then fail
    # (CUDA_ERROR_ILLEGAL_ADDRESS, reported where CUDA reports it).
    fail_after_bytes: int | None = None
    # Copies run for N bytes in total, then stall until the faults change.
    hang_after_bytes: int | None = None
    # N allocations (device or pinned) succeed, then each fails (out of memory).
    fail_alloc: int | None = None
    # N host registrations succeed, then each fails.
    fail_register: int | None = None

    @classmethod
    def parse(cls, text: str) -> EmulatedFaults:
        names = {"fail_after_bytes", "hang_after_bytes", "fail_alloc", "fail_register"}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = (piece.strip() for piece in item.partition("="))
            if name not in names:
                raise InvalidArgument(
                    f"unknown emulated fault {name!r} in {text!r}: use {', '.join(sorted(names))}, "
                    "each as name or name=N"
                )
            try:
                count = int(value) if value else 0
            except ValueError:
                raise InvalidArgument(
                    f"emulated fault {name}={value!r} is not a whole number of bytes or calls"
                ) from None
            if count < 0:
                raise InvalidArgument(f"emulated fault {name}={count} must be 0 or more")
            values[name] = count
        return cls(**values)


def set_emulated_faults(faults: EmulatedFaults | str | None) -> None:
    """Set the emulated driver's faults (None or "" clears them) and restart their counts.

    Copies stalled by a hang fault go on once it is cleared.
    """
    if isinstance(faults, str) or faults is None:
        faults = EmulatedFaults.parse(faults or "")
    if not isinstance(faults, EmulatedFaults):
        raise InvalidArgument(f"faults must be EmulatedFaults, a string or None, not {type(faults).__name__}")
    _engine.set_emulated_faults(
        **{name: -1 if value is None else value for name, value in vars(faults).items()}
    )


def emulated_resources() -> dict[str, int]:
    """Live objects of the emulated driver by kind, and restore threads alive ("workers")."""
    resources = dict(_engine.emulated_resources())
    resources["workers"] = _engine.live_workers()
    return resources


def driver_info(library: str = DRIVER_LIBRARY) -> dict[str, Any]:
    """Whether the CUDA driver library loads, from where, and its version; creates no context."""
    try:
        driver = _engine.Driver.load("cuda", library)
        version = driver.version
    except CudaUnavailable as exc:
        return {"found": False, "library": library, "error": str(exc)}
    except CudaError as exc:
        return {"found": True, "library": library, "error": str(exc)}
    return {
        "found": True,
        "library": library,
        "path": driver.path,
        "version": f"{version // 1000}.{version % 1000 // 10}",
    }


class Engine:
    """The copy engine of one device, for this process. Close it (or use `with`) when done.

    `backend` is "cuda" (the CUDA driver, `library` names it) or "emulated".
    The engine uses the device's primary context: the one torch uses, so it
    can restore into buffers torch allocated.
    """

    def __init__(self, backend: str = "emulated", device: int = 0, *, library: str = DRIVER_LIBRARY):
        if backend not in BACKENDS:
            raise InvalidArgument(f"backend {backend!r} is unknown: use 'cuda' or 'emulated'")
        if not _is_count(device) or device < 0:
            raise InvalidArgument(f"device must be a device index (0, 1, ...), not {device!r}")
        if not isinstance(library, str) or not library:
            raise InvalidArgument("library must name the CUDA driver library, e.g. 'libcuda.so.1'")
        if backend == "emulated":
            _engine.configure_emulation(settings.emulated_gpus())
            faults = settings.emulated_faults()
            if faults:
                set_emulated_faults(faults)
        self.backend = backend
        self._pid = os.getpid()
        self._device = _engine.Device(_engine.Driver.load(backend, library), device)
        self._engine = _engine.Engine(self._device)

    @property
    def device(self) -> int:
        return self._device.ordinal

    @property
    def device_name(self) -> str:
        return self._device.name

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def restore(
        self,
        src: Any,
        dst: Any,
        nbytes: int | None = None,
        *,
        strategy: str | None = None,
        chunk_bytes: int | None = None,
        streams: int | None = None,
        threads: int | None = None,
    ) -> RestoreStats:
        """Copy `nbytes` from host `src` to device `dst`; returns what it did and how fast.

        `src` and `dst` are addresses (int) or objects that know their size: a
        contiguous torch tensor or numpy array, or memory from `alloc`/`alloc_pinned`.
        `nbytes` defaults to the smaller of the sizes known. Unset tuning comes from
        `DEFAULT_STRATEGY`/`DEFAULT_TUNING`. Raises CudaError when a driver call
        fails; the destination then holds no usable data.
        """
        self._require_usable()
        strategy = self._check_strategy(strategy)
        tuning = self._tuning(strategy, chunk_bytes, streams, threads)
        source, destination, nbytes = self._regions(src, dst, nbytes, dst_on_device=True)
        report = self._engine.restore(
            source, destination, nbytes, strategy, tuning.chunk_bytes, tuning.streams, tuning.threads
        )
        return RestoreStats(
            strategy=strategy,
            nbytes=nbytes,
            seconds=report.seconds,
            register_seconds=report.register_seconds,
            setup_seconds=report.setup_seconds,
            chunk_bytes=tuning.chunk_bytes,
            streams=tuning.streams,
            threads=tuning.threads,
        )

    def copy_plain(self, src: Any, dst: Any, nbytes: int | None = None) -> float:
        """One cuMemcpyHtoD of the whole region; returns its seconds.

        From pinned memory (`alloc_pinned`) this is the bus's limit, the
        baseline the strategies are measured against.
        """
        self._require_usable()
        source, destination, nbytes = self._regions(src, dst, nbytes, dst_on_device=True)
        return self._engine.copy_plain(source, destination, nbytes)

    def copy_to_host(self, dst: Any, src: Any, nbytes: int | None = None) -> None:
        """Copy device `src` back to host `dst` (to check a restore)."""
        self._require_usable()
        source, destination, nbytes = self._regions(src, dst, nbytes, dst_on_device=False)
        self._engine.copy_to_host(destination, source, nbytes)

    def alloc(self, nbytes: int) -> _engine.DeviceMemory:
        """Device memory (cuMemAlloc), freed by its `free()` or when dropped."""
        self._require_usable()
        return self._device.alloc(_positive_size(nbytes, "nbytes"))

    def alloc_pinned(self, nbytes: int) -> _engine.PinnedMemory:
        """Page-locked host memory (cuMemHostAlloc), freed by its `free()` or when dropped."""
        self._require_usable()
        return self._device.alloc_pinned(_positive_size(nbytes, "nbytes"))

    def alloc_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 device tensor of `nbytes` to restore into.

        On cuda torch allocates it, so its caching allocator owns the memory. On
        the emulated backend it is emulated device memory (a CPU tensor), so the
        emulated driver's accounting and allocation faults apply to it.
        """
        self._require_usable()
        nbytes = _positive_size(nbytes, "nbytes")
        if self.backend == "emulated":
            return self._device.alloc_tensor(nbytes)
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", self.device))
        except torch.OutOfMemoryError as exc:
            raise CudaError(
                f"allocating {nbytes} bytes of device memory for the restore failed: {exc}",
                "torch.empty",
                2,
                "CUDA_ERROR_OUT_OF_MEMORY",
            ) from exc

    def close(self) -> None:
        """Destroy the engine's streams and staging ring; later calls raise InvalidArgument."""
        self._engine.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Engine {self.backend} device {self.device} ({self.device_name}), {state}>"

    def _require_usable(self) -> None:
        if self._pid != os.getpid():
            raise InvalidArgument(
                f"this Engine was created by process {self._pid}; a forked child must create its own"
            )
        if self.closed:
            raise InvalidArgument("this Engine is closed; create a new one")

    def _check_strategy(self, strategy: str | None) -> str:
        if strategy is None:
            return DEFAULT_STRATEGY[self.backend]
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy {strategy!r} is unknown: use one of {', '.join(STRATEGIES)}")
        return strategy

    def _tuning(self, strategy: str, chunk_bytes: int | None, streams: int | None, threads: int | None) -> Tuning:
        default = DEFAULT_TUNING[self.backend, strategy]
        chunk_bytes = default.chunk_bytes if chunk_bytes is None else _positive_size(chunk_bytes, "chunk_bytes")
        streams = default.streams if streams is None else _bounded(streams, "streams", MAX_STREAMS)
        threads = default.threads if threads is None else _bounded(threads, "threads", MAX_THREADS)
        return Tuning(chunk_bytes, streams, threads)

    def _regions(self, src: Any, dst: Any, nbytes: int | None, *, dst_on_device: bool) -> tuple[int, int, int]:
        """Addresses of host and device regions, and the byte count, checked against their sizes."""
        host, device = (src, dst) if dst_on_device else (dst, src)
        host_role, device_role = ("source", "destination") if dst_on_device else ("destination", "source")
        host_address, host_size = self._region(host, host_role, on_device=False)
        device_address, device_size = self._region(device, device_role, on_device=True)
        if nbytes is None:
            sizes = [size for size in (host_size, device_size) if size is not None]
            if not sizes:
                raise InvalidArgument("nbytes is needed when both regions are given as addresses")
            nbytes = min(sizes)
        nbytes = _positive_size(nbytes, "nbytes")
        for role, size in ((host_role, host_size), (device_role, device_size)):
            if size is not None and nbytes > size:
                raise InvalidArgument(
                    f"nbytes={nbytes} runs past the {role}, which holds {size} bytes: "
                    "pass a smaller nbytes or a larger buffer"
                )
        source, destination = (host_address, device_address) if dst_on_device else (device_address, host_address)
        return source, destination, nbytes

    def _region(self, region: Any, role: str, *, on_device: bool) -> tuple[int, int | None]:
        where = "device" if on_device else "host"
        if isinstance(region, int) and not isinstance(region, bool):
            if region <= 0:
                raise InvalidArgument(f"the {role} address must be a positive {where} address, not {region}")
            return region, None
        if isinstance(region, _engine.DeviceMemory | _engine.PinnedMemory):
            if isinstance(region, _engine.DeviceMemory) and not on_device:
                raise InvalidArgument(f"the {role} must be host memory, not DeviceMemory")
            if isinstance(region, _engine.PinnedMemory) and on_device and self.backend == "cuda":
                raise InvalidArgument(f"the {role} must be device memory, not PinnedMemory")
            if region.address == 0:
                raise InvalidArgument(f"the {role} ({type(region).__name__}) was already freed")
            return region.address, region.nbytes
        if isinstance(region, torch.Tensor):
            expected = "cuda" if on_device and self.backend == "cuda" else "cpu"
            if region.device.type != expected:
                raise InvalidArgument(
                    f"the {role} tensor is on {region.device}; on the {self.backend} backend it must be "
                    f"a {expected} tensor"
                )
            if not region.is_contiguous():
                raise InvalidArgument(f"the {role} tensor must be contiguous: call .contiguous() first")
            return region.data_ptr(), region.numel() * region.element_size()
        if isinstance(region, numpy.ndarray):
            if on_device and self.backend == "cuda":
                raise InvalidArgument(f"the {role} must be device memory on the cuda backend, not a numpy array")
            if not region.flags.c_contiguous:
                raise InvalidArgument(f"the {role} array must be C-contiguous: use numpy.ascontiguousarray")
            return region.ctypes.data, region.nbytes
        raise InvalidArgument(
            f"the {role} must be an address (int), a torch tensor, a numpy array or engine memory, "
            f"not {type(region).__name__}"
        )


class SnapshotLike(Protocol):
    """What `restore_snapshot` needs of a snapshot."""

    address: int  # start of the data region in host memory
    nbytes: int  # length of the data region

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]: ...


def restore_snapshot(
    snapshot: SnapshotLike, device: str | torch.device | None = None, **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], RestoreStats]:
    """Copy a snapshot's data region into one new device buffer and rebuild its tensors over it.

    `restore_region`, which takes the same `device` and keyword `options`, then
    `snapshot.views`. Returns the buffer, the tensors as views of it by name,
    and the restore's figures.
    """
    buffer, stats = restore_region(snapshot, device, **options)
    return buffer, snapshot.views(buffer), stats


def restore_region(
    snapshot: SnapshotLike,
    device: str | torch.device | None = None,
    *,
    engine: Engine | None = None,
    strategy: str | None = None,
    chunk_bytes: int | None = None,
    streams: int | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, RestoreStats]:
    """Copy a snapshot's data region into one new device buffer; return it and the restore's figures.

    `device` is "cuda" (or "cuda:N") for the CUDA backend, "cpu" for the
    emulated one; it may be left out when `engine` is given. Without
    `engine`, one is made for this call and closed after it. A failed restore
    raises CudaError and frees the buffer. The runtime calls this and points
    its own tensors at the buffer (PackedModel.rebind); `restore_snapshot`
    rebuilds new ones.
    """
    address, nbytes = _snapshot_region(snapshot)
    backend, index = _backend_for(device, engine)
    own_engine = engine is None
    if engine is None:
        engine = Engine(backend, index)
    try:
        buffer = engine.alloc_buffer(nbytes)
        if backend == "cuda":
            # The caching allocator may hand back a block that kernels queued
            # on torch's stream still use; the engine's streams do not wait for them.
            torch.cuda.current_stream(buffer.device).synchronize()
        try:
            # By address, so that no frame of a failure's traceback holds the buffer.
            stats = engine.restore(
                address,
                buffer.data_ptr(),
                nbytes,
                strategy=strategy,
                chunk_bytes=chunk_bytes,
                streams=streams,
                threads=threads,
            )
        except BaseException:
            del buffer  # a failed restore's memory is freed now, never handed out
            raise
        return buffer, stats
    finally:
        if own_engine:
            engine.close()


def _snapshot_region(snapshot: Any) -> tuple[int, int]:
    for member in ("address", "nbytes", "views"):
        if not hasattr(snapshot, member):
            raise InvalidArgument(
                f"snapshot has no {member!r}: pass a zerogpu Snapshot (address, nbytes, views(buffer))"
            )
    address, nbytes = snapshot.address, snapshot.nbytes
    if not _is_count(address) or address <= 0:
        raise InvalidArgument(f"snapshot.address must be a positive host address, not {address!r}")
    if not _is_count(nbytes) or nbytes <= 0:
        raise InvalidArgument(f"snapshot.nbytes must be a positive byte count, not {nbytes!r}")
    return address, nbytes


def _backend_for(device: str | torch.device | None, engine: Engine | None) -> tuple[str, int]:
    if device is None:
        if engine is None:
            raise InvalidArgument("give the device to restore to ('cuda' or 'cpu' for emulated) or an engine")
        return engine.backend, engine.device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device {device!r} is not a torch device: use 'cuda', 'cuda:N' or 'cpu'") from None
    if parsed.type not in ("cuda", "cpu"):
        raise InvalidArgument(f"cannot restore to {parsed.type}: use 'cuda' (CUDA backend) or 'cpu' (emulated)")
    backend = "cuda" if parsed.type == "cuda" else "emulated"
    if engine is None:
        return backend, parsed.index or 0
    if engine.backend != backend or (parsed.index is not None and parsed.index != engine.device):
        raise InvalidArgument(
            f"device {device!r} does not match the engine ({engine.backend}, device {engine.device}): "
            "give the engine's device or leave device out"
        )
    return backend, engine.device


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_size(value: Any, name: str) -> int:
    if not _is_count(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive whole number of bytes, not {value!r}")
    return value


def _bounded(value: Any, name: str, maximum: int) -> int:
    if not _is_count(value) or not 1 <= value <= maximum:
        raise InvalidArgument(f"{name} must be a whole number from 1 to {maximum}, not {value!r}")
    return value
