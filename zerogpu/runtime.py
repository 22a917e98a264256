"""The process-wide state of an enabled zerogpu: backend, packed models, warm workers.

`enable()` patches torch (CUDA emulation) and chooses the backend;
`startup()` packs what was moved to 'cuda' so far. The first decorated call
runs `startup()` if nobody did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

from . import settings
from .cuda import emulation
from .errors import InvalidArgument
from .progress import bytes_progress
from .snapshot import packing, segments

# Tensors moved to 'cuda' after the first call are packed once they add up to this.
LATE_PACK_BYTES = 64 * 2**20
# Packs of this many bytes or more show a progress bar on stderr.
PROGRESS_BYTES = 2**30

_lock = threading.RLock()
_enabled = False
_backend: str | None = None
_models: list = []
_started = False
# emulation.marks() when tensors moved to 'cuda' were last looked for.
_looked = -1
# Counts the changes to the set of packed models: a warm worker forked before
# the last one holds stale weights, or lacks some, and is not used again.
generation = 0
# Functions that may run in a worker, by key: a worker forked later finds them here.
functions: dict[str, Callable] = {}
# Each decorated function's wrapper, and each wrapper itself: decorating twice gives one wrapper.
wrappers: dict[Callable, Callable] = {}
# What the parts above the runtime (warm workers) undo at disable(), first to last.
# They import the runtime, so it cannot import them.
_cleanups: list[Callable[[], None]] = []
# Signals that end a process without running its exit clean-up (docker stop, systemctl stop,
# a closed terminal), and the handlers they had before enable().
TERMINATING = (signal.SIGTERM, signal.SIGHUP)
_previous_handlers: dict[int, object] = {}
# Whether this process (not only its parent) has taken those signals over.
_handling = False


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Turn zerogpu on for this process: emulate CUDA in the parent and choose the backend.

    Call it before moving models to 'cuda' and before decorating functions
    (or set ZEROGPU=1 in the environment, which calls it on import).
    """
    global _enabled, _backend
    with _lock:
        if _enabled:
            return
        # The engine is imported here, once, so that workers inherit it instead of importing it per call.
        from .cuda import devices, engine  # noqa: F401

        backend = choose_backend()
        first = devices.discover(backend)[0]
        # The driver's /proc files do not tell the memory (NVML does): keep the default then.
        memory = {"total_memory": first.total_memory} if first.total_memory > 0 else {}
        emulation.patch(emulation.DeviceInfo(name=first.name, count=1, **memory))
        if backend == "emulated":
            _turn_hub_kernels_off()
        segments.sweep()  # what crashed apps left in /dev/shm
        handle_termination()
        _backend = backend
        _enabled = True


# Whether enable() set USE_HUB_KERNELS, so that disable() unsets it again.
_set_hub_kernels = False


def _turn_hub_kernels_off() -> None:
    # transformers (5.x) swaps layers for Hub kernels when a model loads onto
    # 'cuda'. Those are compiled CUDA code: on the emulated backend the data
    # stays on the CPU, where they cannot run, and fetching them needs the
    # Hub. A value the user set is theirs to keep.
    global _set_hub_kernels
    if "USE_HUB_KERNELS" not in os.environ:
        os.environ["USE_HUB_KERNELS"] = "NO"
        _set_hub_kernels = True


def _turn_hub_kernels_back() -> None:
    global _set_hub_kernels
    if _set_hub_kernels:
        os.environ.pop("USE_HUB_KERNELS", None)
        _set_hub_kernels = False


def disable() -> None:
    """Turn zerogpu off again: kill warm workers, free the snapshots, give torch back.

    Decorated functions then run in-process, as they would had zerogpu never
    been enabled. Meant for tests and for tools that enable zerogpu briefly.
    """
    global _enabled, _backend, _started, _looked
    from .schedule.choice import reset_scheduler

    with _lock:
        if not _enabled:
            return
        for cleanup in _cleanups:
            cleanup()
        for model in _models:
            model.close()
        _models.clear()
        functions.clear()
        wrappers.clear()
        reset_scheduler()
        emulation.unpatch()
        _turn_hub_kernels_back()
        restore_termination()
        _enabled = False
        _backend = None
        _started = False
        _looked = -1


def handle_termination() -> None:
    """Free this process's segments when SIGTERM or SIGHUP would end it, as an ordinary exit does.

    Only a signal left at its default is taken over; after the clean-up the
    process still ends by that signal. A handler the app installed runs as
    before (an exit from it runs the clean-up anyway), and an ignored signal
    stays ignored. Handlers can be set from the main thread only: enabled on
    another, zerogpu leaves them alone.
    """
    global _handling
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in TERMINATING:
        current = signal.getsignal(signum)
        if current is _terminated or current in (signal.SIG_IGN, None):
            continue
        _previous_handlers[signum] = current
        signal.signal(signum, _terminated)
    _handling = True


def restore_termination() -> None:
    global _handling
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous_handlers.items()):
        if signal.getsignal(signum) is _terminated:
            signal.signal(signum, previous)
        del _previous_handlers[signum]
    _handling = False


def _after_fork_in_child() -> None:
    # A child the app forks (a multiprocessing pool's worker, a DataLoader's) gets the app's own
    # handlers back. It has made no segment yet, and a handler written in Python breaks it: CPython
    # runs one between bytecodes, so a SIGTERM that lands just before a blocking wait (the
    # pool.terminate() of a worker about to wait for its queue's lock) waits with it, forever.
    # Should the child call a decorated function, ensure_started() takes the signals over again.
    # Fork runs this on the thread that forked, the child's main thread from now on.
    restore_termination()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _terminated(signum: int, frame) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # the app's own: it decides how to end
        return
    # Unlinking names only: nothing here waits for a lock the interrupted code may hold.
    # The workers go with this process (their parent-death signal).
    segments.remove_segments_of(os.getpid())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def at_disable(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` whenever zerogpu is disabled, before the snapshots are freed."""
    if cleanup not in _cleanups:
        _cleanups.append(cleanup)


def choose_backend() -> str:
    from .cuda import devices

    chosen = settings.backend()
    visible = devices.gpu_visible()
    if chosen == "cuda" and not visible:
        raise InvalidArgument(
            "ZEROGPU_BACKEND=cuda but no NVIDIA GPU is visible to this process; "
            "unset it (zerogpu then emulates the GPU on the CPU) or check CUDA_VISIBLE_DEVICES"
        )
    return chosen or ("cuda" if visible else "emulated")


def backend() -> str:
    if _backend is None:
        raise InvalidArgument("zerogpu is not enabled: call zerogpu.enable() or set ZEROGPU=1")
    return _backend


def startup(progress: Callable[[int], None] | None = None) -> int:
    """Pack every tensor moved to 'cuda' and not packed yet; return the bytes packed.

    Runs by itself before the first call; call it yourself to pack at start-up
    (a web app before it serves) rather than on the first request.
    """
    global _started
    with _lock:
        backend()  # enabled, or InvalidArgument
        packed = pack(fresh_tensors(), progress)
        _started = True
        return packed


def ensure_started() -> None:
    """Before each call: pack at the first one; later, pack a model moved to 'cuda' since.

    Tensors moved to 'cuda' after the first call are packed once they add up
    to LATE_PACK_BYTES (a model loaded later); smaller ones, such as a request's
    inputs, are not worth a snapshot and travel with the call. Snapshots whose
    tensors are all gone are freed. Neither costs anything while nothing changed.
    """
    with _lock:
        if _enabled and not _handling:
            handle_termination()  # a forked child that calls, as its parent did at enable()
        if not _started:
            startup()
            return
        for model in [m for m in _models if not m.held]:
            _models.remove(model)
            model.close()
            changed()
        if emulation.marks() != _looked:
            fresh = fresh_tensors()
            if packing.storage_bytes(fresh) >= LATE_PACK_BYTES:
                pack(fresh, None)


def fresh_tensors() -> list:
    """Live tensors moved to 'cuda' that no snapshot holds."""
    global _looked
    _looked = emulation.marks()
    return packing.unpacked(_models)


def pack(tensors: list, progress: Callable[[int], None] | None) -> int:
    with contextlib.ExitStack() as stack:
        total = packing.storage_bytes(tensors)
        if progress is None and total >= PROGRESS_BYTES:
            progress = stack.enter_context(bytes_progress("packing model weights", total))
        model = packing.pack(tensors, progress=progress)
    if model is None:
        return 0
    _models.append(model)
    changed()
    return model.nbytes


def changed() -> None:
    global generation
    generation += 1


def models() -> list:
    return list(_models)
