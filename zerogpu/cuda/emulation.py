"""CUDA emulation: 'cuda' tensors that keep their data on the CPU.

The app's main process must never create a CUDA context (only forked workers
touch the GPU), yet user code moves models to 'cuda' at import time as usual.
`patch()` makes that work: a tensor moved to 'cuda' keeps its data on the CPU,
reports `cuda:0` and is recorded in a registry; the runtime later packs the
registry's live tensors into a snapshot and each worker restores them onto its
GPU. On the emulated backend the same patch runs inside workers, where 'cuda'
tensors simply are CPU tensors that report `cuda:0`.

Being "on cuda" is a mark kept beside the tensor (its Python object, weakly
held), not a tensor subclass: the data stays in the tensor itself, so the
runtime can rebind it (`rebind`) to a view of shared memory or of a restored
device buffer. A torch function mode, active in every thread, answers device
queries for marked tensors, runs 'cuda' requests on the CPU, marks the outputs
of ops on marked tensors and raises torch's own error when marked and CPU
tensors meet. `torch.cuda` queries answer from a `DeviceInfo`, and anything
that would still initialize CUDA raises `CudaInitialized` naming the call.

This module is the emulation's public face and its lifecycle (patch, unpatch,
activate, suspended). The parts live beside it: emulated_devices (the
DeviceInfo patched in, each thread's current device, device arguments),
registry (the marks), torch_mode (the function mode), torch_cuda (the
torch.cuda answers) and replacements (what patch() replaces in torch).
"""

from __future__ import annotations

import os
import threading
import torch

from ..errors import CudaInitialized, InvalidArgument
from . import compiling, emulated_devices, replacements, torch_mode
from .emulated_devices import DeviceInfo
from .registry import is_cuda, live_tensors, mark, marks, rebind, unmark
from .torch_cuda import DeviceProperties

__all__ = [
    "DeviceInfo",
    "DeviceProperties",
    "patch",
    "unpatch",
    "activate",
    "suspended",
    "is_patched",
    "is_cuda",
    "mark",
    "unmark",
    "rebind",
    "live_tensors",
    "marks",
]

_patch_lock = threading.Lock()


def _new_patch_lock() -> None:
    # A worker is forked from whatever thread asks for it; one that forked
    # while another thread held the lock would find it held forever.
    global _patch_lock
    _patch_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_patch_lock)


def patch(device: DeviceInfo | None = None) -> None:
    """Emulate CUDA in this process, for every thread that runs from now on.

    Idempotent: a second call only makes sure the calling thread has the
    emulation. Raises CudaInitialized when CUDA is already initialized, and
    InvalidArgument when torch is already patched for another DeviceInfo.
    """
    if device is not None and not isinstance(device, DeviceInfo):
        raise InvalidArgument(f"patch() takes a zerogpu.cuda.emulation.DeviceInfo, not {device!r}")
    with _patch_lock:
        patched = emulated_devices.patched
        if patched is not None:
            if device is not None and device != patched:
                raise InvalidArgument(
                    f"torch is already patched for {patched}; call unpatch() before patching "
                    f"it for {device}"
                )
            torch_mode.enter_mode()
            return
        if torch.cuda.is_initialized():
            raise CudaInitialized(
                "CUDA was initialized in this process before zerogpu patched torch, so this "
                "process holds a CUDA context that its forked workers could not use. Import "
                "zerogpu before anything that uses CUDA (with ZEROGPU=1 set, or call "
                "zerogpu.enable() right after the import), or start the app with "
                "`zerogpu run app.py`, which does both first."
            )
        replacements.install()
        # Before anything imports torch's compilers, which fix their cache folder on import.
        compiling.use_app_cache()
        emulated_devices.set_patched(device if device is not None else DeviceInfo())
        torch_mode.enter_mode()


def unpatch() -> None:
    """Give torch back exactly as it was.

    The record of emulated tensors is kept: a worker on the real cuda backend
    unpatches first, then moves the recorded tensors onto its GPU. Threads
    other than the caller may keep the mode on their stacks; unpatched, it
    passes every call through unchanged.
    """
    with _patch_lock:
        if emulated_devices.patched is None:
            return
        emulated_devices.set_patched(None)
        replacements.restore()
        torch_mode.leave_mode()
        emulated_devices.forget_current_index()


def activate() -> None:
    """Make sure the calling thread runs with the emulation, in a process already patched.

    A forked worker inherits the patch, but only the thread that forked it,
    which need not have had the emulation (a thread started before patch()).
    """
    if emulated_devices.patched is None:
        raise InvalidArgument(
            "activate() needs torch patched in this process: call zerogpu.cuda.emulation.patch() first"
        )
    torch_mode.enter_mode()


def suspended():
    """Run the block in this thread with torch unpatched: emulated tensors are plain CPU tensors.

    For code that must see the data as it is, such as packing a snapshot.
    Other threads keep the emulation.
    """
    return torch_mode.suspended()


def is_patched() -> bool:
    """Whether torch is patched in this process."""
    return emulated_devices.patched is not None
