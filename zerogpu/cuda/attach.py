"""Step 4, in the worker: take the leased GPU (or its emulation) and open a context on it."""

from __future__ import annotations

import os

from ..errors import AttachError


def attach(lease, backend: str):
    """Make the leased device this process's only GPU and return a copy engine on it.

    On the cuda backend the emulation is removed first: from here on torch is
    plain torch, with a real context on `cuda:0`, which is the leased device.
    A half-GPU lease caps torch's allocator to its half of the memory.
    """
    from . import emulation
    from .engine import Engine

    os.environ["CUDA_VISIBLE_DEVICES"] = lease.device.visible_id
    if backend == "emulated":
        emulation.activate()
        return Engine("emulated")
    import torch

    emulation.unpatch()
    try:
        torch.cuda.init()
        torch.cuda.set_device(0)
        if lease.memory_fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(lease.memory_fraction, 0)
        torch.empty(1, device="cuda")
        return Engine("cuda", 0)
    except Exception as exc:
        raise AttachError(
            f"could not attach GPU {lease.device.visible_id} ({lease.device.name}): {exc}. "
            "Check that the driver works (nvidia-smi) and that no other process holds the device "
            "in exclusive mode."
        ) from exc
