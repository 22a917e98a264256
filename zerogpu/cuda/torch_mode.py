"""The torch function mode that places torch's results on the emulated devices.

Active in every thread while torch is patched, the mode answers device
queries for marked tensors, runs 'cuda' requests on the CPU, marks the
outputs of ops on marked tensors and raises torch's own error when marked and
CPU tensors meet.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, NoReturn

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import DeviceContext, _device_constructors

from . import emulated_devices
from .emulated_devices import cuda_device, cuda_target, current_index, is_device_argument
from .registry import marked


def _collect(items: tuple | list, found: list[torch.Tensor]) -> None:
    # A list is searched only when it starts with a tensor: lists of numbers
    # (torch.tensor(data), sizes) can be long and never hold one.
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, tuple) or (
            isinstance(item, list) and item and isinstance(item[0], torch.Tensor)
        ):
            _collect(item, found)


def _tensors_in(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _collect(args, found)
    if kwargs:
        _collect(tuple(kwargs.values()), found)
    return found


def _mismatch(first: str, second: str) -> NoReturn:
    raise RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, "
        f"{first} and {second}!"
    )


def _common_index(tensors: list[torch.Tensor]) -> tuple[int | None, list[torch.Tensor]]:
    """The emulated cuda index the tensors share (None when none is marked), and the unmarked ones.

    Raises torch's device-mismatch error when marked tensors meet CPU tensors
    (CPU scalars, 0-dim, may mix, as they may with real CUDA tensors) or
    marked tensors of another index.
    """
    index = None
    loose = []
    for tensor in tensors:
        found = marked.index(tensor)
        if found is None:
            loose.append(tensor)
        elif index is None:
            index = found
        elif found != index:
            _mismatch(f"cuda:{index}", f"cuda:{found}")
    if index is not None:
        for tensor in loose:
            if tensor.dim() != 0:
                _mismatch(f"cuda:{index}", str(tensor.device))
    return index, loose


def _mark_outputs(result: object, index: int, skip: list[torch.Tensor] | None) -> None:
    if isinstance(result, torch.Tensor):
        if skip is None or not any(result is tensor for tensor in skip):
            marked.set(result, index)
    elif isinstance(result, tuple) or (
        isinstance(result, list) and result and isinstance(result[0], torch.Tensor)
    ):
        for item in result:
            _mark_outputs(item, index, skip)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type != "cpu" or b.device.type != "cpu":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _place(result: Any, target: int | None, sources: list[torch.Tensor]) -> Any:
    """Mark what an op that names a device made, copying what aliases another device.

    On the CPU, moving a tensor to the device it is already on returns it, or
    a view of it; on a real GPU the result is a copy on the new device. So an
    output that shares memory with an input of another (emulated) device is
    replaced by a copy before it is marked for `target` (None: the CPU).
    """

    def settle(tensor: torch.Tensor) -> torch.Tensor:
        for source in sources:
            if marked.index(source) != target and _same_memory(tensor, source):
                tensor = torch.Tensor.clone(tensor)
                break
        if target is not None:
            marked.set(tensor, target)
        return tensor

    if isinstance(result, torch.Tensor):
        return settle(result)
    if isinstance(result, (tuple, list)):
        items = [_place(item, target, sources) for item in result]
        if all(new is old for new, old in zip(items, result)):
            return result
        if hasattr(result, "_fields"):
            return type(result)(*items)
        return type(result)(items)
    return result


def _context_device() -> torch.device | None:
    """The device a `with torch.device(...)` or set_default_device block gives factories.

    torch's DeviceContext mode always sits at the bottom of the mode stack,
    below this emulation, so it would add device='cuda' after the emulation
    has run: the emulation reads it first.
    """
    for position in range(torch._C._len_torch_function_stack() - 1, -1, -1):
        mode = torch._C._get_function_stack_at(position)
        if isinstance(mode, DeviceContext):
            return mode.device
    return None


def _create(func: Callable, args: tuple, kwargs: dict, device: object) -> Any:
    target = cuda_target(device)
    if target is not None:
        kwargs = {**kwargs, "device": "cpu"}
    result = func(*args, **kwargs)
    return _place(result, target, _tensors_in(args, kwargs))


def _run(func: Callable, args: tuple, kwargs: dict) -> Any:
    device = kwargs.get("device")
    if device is None and func in _CONSTRUCTORS:
        device = _context_device()
    if device is not None:
        return _create(func, args, kwargs, device)
    tensors = _tensors_in(args, kwargs)
    if not tensors:
        return func(*args, **kwargs)
    index, loose = _common_index(tensors)
    result = func(*args, **kwargs)
    if index is not None:
        # Never mark a CPU scalar that an op hands back as its result.
        _mark_outputs(result, index, loose or None)
    return result


def _move(func: Callable, args: tuple, kwargs: dict, target: int | None) -> Any:
    """Run a device move on the CPU and place its result on `target` (None: the CPU)."""
    result = func(*args, **kwargs)
    return _place(result, target, [args[0]])


def _to(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Tensor.to(device, ...), Tensor.to(dtype, ...) and Tensor.to(other, ...)."""
    rest = args[1:]
    if kwargs.get("device") is not None:
        target = cuda_target(kwargs["device"])
        if target is not None:
            kwargs = {**kwargs, "device": "cpu"}
    elif rest and isinstance(rest[0], torch.Tensor):
        other = rest[0]
        target = marked.index(other)
        if target is None and other.device.type == "cpu" and marked.index(args[0]) is None:
            return func(*args, **kwargs)
    elif rest and is_device_argument(rest[0]):
        target = cuda_target(rest[0])
        if target is not None:
            args = (args[0], "cpu", *rest[1:])
    else:
        return _run(func, args, kwargs)
    return _move(func, args, kwargs, target)


def _cuda_arguments(
    self: torch.Tensor,
    device: object = None,
    non_blocking: bool = False,
    memory_format: torch.memory_format = torch.preserve_format,
) -> tuple[torch.Tensor, object, bool, torch.memory_format]:
    return self, device, non_blocking, memory_format


def _cuda(func: Callable, args: tuple, kwargs: dict) -> Any:
    self, device, non_blocking, memory_format = _cuda_arguments(*args, **kwargs)
    target = current_index() if device is None else cuda_target(device)
    if target is None:
        raise RuntimeError(f"Invalid device, must be cuda device (got {device!r})")
    return _move(
        torch.Tensor.to,
        (self, "cpu"),
        {"non_blocking": non_blocking, "memory_format": memory_format},
        target,
    )


def _cpu(func: Callable, args: tuple, kwargs: dict) -> Any:
    if marked.index(args[0]) is None:
        return func(*args, **kwargs)
    return _move(func, args, kwargs, None)


def _type_as(func: Callable, args: tuple, kwargs: dict) -> Any:
    # type_as moves self to other's device as well as to its dtype.
    return _move(func, args, kwargs, marked.index(args[1]))


def _type(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Tensor.type(): names with '.cuda.' for marked tensors; 'torch.cuda.*' targets move."""
    self = args[0]
    index = marked.index(self)
    wanted = args[1] if len(args) > 1 else kwargs.get("dtype")
    if wanted is None:
        name = func(*args, **kwargs)
        return name if index is None else name.replace("torch.", "torch.cuda.", 1)
    if isinstance(wanted, str):
        on_cuda = wanted.startswith("torch.cuda.")
        cpu_name = wanted.replace("torch.cuda.", "torch.", 1)
        rest = {key: value for key, value in kwargs.items() if key != "dtype"}
        target = (current_index() if index is None else index) if on_cuda else None
        return _move(func, (self, cpu_name, *args[2:]), rest, target)
    return _run(func, args, kwargs)


def _parse_to(func: Callable, args: tuple, kwargs: dict) -> Any:
    """torch._C._nn._parse_to, which Module.to uses to read its arguments."""
    if "device" in kwargs and isinstance(kwargs["device"], int):
        kwargs = {**kwargs, "device": cuda_device(cuda_target(kwargs["device"]))}
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        args = (cuda_device(cuda_target(args[0])), *args[1:])
    device, dtype, non_blocking, memory_format = func(*args, **kwargs)
    if args and isinstance(args[0], torch.Tensor):
        index = marked.index(args[0])
        if index is not None:
            device = cuda_device(index)
    return device, dtype, non_blocking, memory_format


def _self_decides(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Ops whose other tensors may live anywhere: indexing, copy_, new_*.

    Real CUDA tensors accept CPU index tensors and copy from or to any device;
    the result lives where self does.
    """
    device = kwargs.get("device")
    if device is not None:
        return _create(func, args, kwargs, device)
    result = func(*args, **kwargs)
    index = marked.index(args[0])
    if index is not None:
        _mark_outputs(result, index, None)
    return result


def _set_data(func: Callable, args: tuple, kwargs: dict) -> None:
    # `param.data = t` moves param to t's device: Module._apply moves parameters so.
    self, data = args
    func(self, data)
    index = marked.index(data)
    if index is None:
        marked.discard(self)
    else:
        marked.set(self, index)
        marked.moved(self)


def _in_place_storage(func: Callable, args: tuple, kwargs: dict) -> Any:
    # set_ and resize_ give a tensor other memory: its bytes are counted again.
    result = _self_decides(func, args, kwargs)
    marked.moved(args[0])
    return result


def _device(func: Callable, args: tuple, kwargs: dict) -> Any:
    """torch.device(0): a bare ordinal names a CUDA device, as in a CUDA build of torch.

    torch resolves it through torch.accelerator's C++ side, which knows no
    emulation and would say there is no accelerator.
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], int) and not isinstance(args[0], bool):
        if args[0] >= 0:
            return cuda_device(cuda_target(args[0]))
    return func(*args, **kwargs)


def _device_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    index = marked.index(args[0])
    return func(*args, **kwargs) if index is None else cuda_device(index)


def _is_cuda_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    return func(*args, **kwargs) or marked.index(args[0]) is not None


def _is_cpu_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    return marked.index(args[0]) is None and func(*args, **kwargs)


def _get_device(func: Callable, args: tuple, kwargs: dict) -> Any:
    index = marked.index(args[0])
    return func(*args, **kwargs) if index is None else index


def _repr(func: Callable, args: tuple, kwargs: dict) -> Any:
    # torch's printer asks the tensor for its device: the mode must answer it,
    # so the printer (what Tensor.__repr__ calls) runs with the mode back on.
    if marked.index(args[0]) is None:
        return func(*args, **kwargs)
    with MODE:
        return torch._tensor_str._str(*args, **kwargs)


def _format(func: Callable, args: tuple, kwargs: dict) -> Any:
    # What Tensor.__format__ does, with its str() fallback coming back to the mode.
    self, spec = args
    if marked.index(self) is None or (self.dim() == 0 and type(self) is torch.Tensor):
        return func(*args, **kwargs)
    with MODE:
        return object.__format__(self, spec)


def _numpy(func: Callable, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    index = marked.index(self)
    if index is not None and not kwargs.get("force", False):
        raise TypeError(
            f"can't convert cuda:{index} device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )
    return func(*args, **kwargs)


def _pin_memory(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Pinning needs a CUDA context; an emulated pinned copy is a plain copy."""
    self = args[0]
    if marked.index(self) is not None:
        name = _type(torch.Tensor.type, (self,), {})
        raise RuntimeError(f"cannot pin '{name}' only dense CPU tensors can be pinned")
    return torch.Tensor.clone(self, memory_format=torch.contiguous_format)


def _is_pinned(func: Callable, args: tuple, kwargs: dict) -> bool:
    # torch asks the CUDA driver, which takes a context to answer; emulated
    # memory is never pinned.
    return False


def _metadata(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Questions about tensors' types and layout, which torch answers across devices.
    return func(*args, **kwargs)


_HANDLERS: dict[Callable, Callable[[Callable, tuple, dict], Any]] = {
    torch._has_compatible_shallow_copy_type: _metadata,
    torch.is_same_size: _metadata,
    torch.Tensor.is_set_to: _metadata,
    torch.Tensor.to: _to,
    torch.Tensor.cuda: _cuda,
    torch.Tensor.cpu: _cpu,
    torch.Tensor.type_as: _type_as,
    torch.Tensor.type: _type,
    torch._C._nn._parse_to: _parse_to,
    torch.Tensor.data.__set__: _set_data,
    torch.Tensor.device.__get__: _device_of,
    torch.Tensor.is_cuda.__get__: _is_cuda_of,
    torch.Tensor.is_cpu.__get__: _is_cpu_of,
    torch.Tensor.get_device: _get_device,
    torch.Tensor.__repr__: _repr,
    torch.Tensor.__format__: _format,
    torch.Tensor.numpy: _numpy,
    torch.Tensor.__array__: _numpy,
    torch.Tensor.pin_memory: _pin_memory,
    torch.Tensor.is_pinned: _is_pinned,
    torch.Tensor.__getitem__: _self_decides,
    torch.Tensor.__setitem__: _self_decides,
    torch.Tensor.copy_: _self_decides,
    torch.Tensor.set_: _in_place_storage,
    torch.Tensor.resize_: _in_place_storage,
    torch.device: _device,
    torch.Tensor.index_put_: _self_decides,
    torch.Tensor.index_put: _self_decides,
    torch.Tensor.new_tensor: _self_decides,
    torch.Tensor.new_empty: _self_decides,
    torch.Tensor.new_empty_strided: _self_decides,
    torch.Tensor.new_zeros: _self_decides,
    torch.Tensor.new_ones: _self_decides,
    torch.Tensor.new_full: _self_decides,
}
_CONSTRUCTORS = frozenset(_device_constructors())


class _CudaEmulation(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if emulated_devices.patched is None:
            # Unpatched: threads that still hold the mode see torch unchanged.
            return func(*args, **kwargs)
        if kwargs.get("pin_memory"):
            # Pinning takes a CUDA context; emulated pinned memory is plain memory.
            kwargs = {**kwargs, "pin_memory": False}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return _run(func, args, kwargs)


# One mode for every thread, so that any thread's stack can be searched for it.
MODE = _CudaEmulation()


def mode_active() -> bool:
    return any(
        torch._C._get_function_stack_at(position) is MODE
        for position in range(torch._C._len_torch_function_stack())
    )


# The threads that have had the mode, so that an error can tell a thread
# started before patch() from one whose torch is inside a compiler's tracing.
_threads: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def entered_in_this_thread() -> bool:
    return threading.current_thread() in _threads


def enter_mode() -> None:
    _threads.add(threading.current_thread())
    if not mode_active():
        torch._C._push_on_torch_function_stack(MODE)


def leave_mode() -> None:
    """Take the mode off this thread's stack, wherever it is, keeping the modes above it."""
    above = []
    while torch._C._len_torch_function_stack():
        mode = torch._C._pop_torch_function_stack()
        if mode is MODE:
            break
        above.append(mode)
    for mode in reversed(above):
        torch._C._push_on_torch_function_stack(mode)



@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """This thread without the mode for the block: emulated tensors are plain CPU tensors."""
    active = mode_active()
    if active:
        leave_mode()
    was_suspended = emulated_devices.is_suspended()
    emulated_devices.set_suspended(True)
    try:
        yield
    finally:
        emulated_devices.set_suspended(was_suspended)
        if active and emulated_devices.patched is not None:
            enter_mode()
