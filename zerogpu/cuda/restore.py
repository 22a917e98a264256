"""Step 5, in the worker: copy the packed weights onto the device and rebind the tensors.

Every tensor the parent recorded keeps its Python identity (the same
`nn.Parameter` objects the user's modules hold); only its data moves, so
`model.weight` inside the user's function is the restored one.
"""

from __future__ import annotations

from ..errors import CudaError, RestoreError
from ..units import describe_size


def restore(models: list, engine, backend: str, lease, late: list = ()) -> list[dict]:
    """Restore every packed model through the engine; give each restore's figures.

    `late` are the recorded tensors no snapshot holds (moved to 'cuda' after
    packing): on a real GPU they are moved one by one.
    """
    from .engine import restore_region

    device = "cuda" if backend == "cuda" else "cpu"
    figures = []
    try:
        for model in models:
            buffer, stats = restore_region(model.snapshot, device, engine=engine)
            model.rebind(buffer, keep_mark=backend == "emulated")
            figures.append(vars(stats))
        if backend == "cuda":
            move_late(late)
    except Exception as exc:
        if isinstance(exc, CudaError) and exc.name == "CUDA_ERROR_OUT_OF_MEMORY":
            raise RestoreError(out_of_memory(models, lease)) from exc
        raise RestoreError(f"could not restore the model's weights onto the device: {exc}") from exc
    return figures


def out_of_memory(models: list, lease) -> str:
    needed = f"the weights need {describe_size(sum(model.nbytes for model in models))} of device memory"
    total = lease.device.total_memory
    if total > 0:  # unknown without NVML
        needed += f" and this lease allows {describe_size(lease.memory_fraction * total)} of {describe_size(total)}"
    advice = (
        "ask for a whole GPU with @zerogpu.GPU(size='xlarge')" if lease.memory_fraction < 1.0
        else "the model does not fit this GPU: use a smaller model or a GPU with more memory"
    )
    return f"{needed} ({lease.device.name}); {advice}"


def move_late(late: list) -> None:
    for tensor in late:
        tensor.data = tensor.data.to("cuda")
