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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import threading
import weakref
from typing import Any, Callable, Iterator, NoReturn

import torch
import torch.cuda.memory
import torch.cuda.random
import torch.serialization
from torch.overrides import TorchFunctionMode
from torch.utils._device import DeviceContext, _device_constructors

from ..errors import CudaInitialized, InvalidArgument

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


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the `torch.cuda` queries report while torch is patched."""

    name: str = "zerogpu emulated GPU"
    total_memory: int = 80 * 2**30
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"DeviceInfo.name must be a non-empty string, not {self.name!r}")
        for field, least in (
            ("total_memory", 1),
            ("major", 0),
            ("minor", 0),
            ("multi_processor_count", 1),
            ("count", 1),
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidArgument(
                    f"DeviceInfo.{field} must be an integer of at least {least}, not {value!r}"
                )


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What `torch.cuda.get_device_properties` returns while torch is patched."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int


class _Registry:
    """The emulated-cuda tensors and their device index, held weakly.

    Written by hand rather than with torch.utils.weak.WeakTensorKeyDictionary:
    that class wraps every looked-up key in a weak reference whose comparison
    runs in Python (about 2.5 us a hit), and the registry is asked once per
    tensor argument of every torch call. A dict keyed by id() answers in about
    0.15 us; each entry keeps a weak reference whose callback removes it when
    the tensor is freed, and a lookup checks that reference so a reused id can
    never answer for a dead tensor.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int]] = {}
        self.added = 0  # entries ever made: a count that only grows

    def index(self, tensor: torch.Tensor) -> int | None:
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def set(self, tensor: torch.Tensor, index: int) -> None:
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            if entry[1] != index:
                self._entries[key] = (entry[0], index)
            return
        self._entries[key] = (weakref.ref(tensor, functools.partial(self._forget, key)), index)
        self.added += 1

    def discard(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            del self._entries[key]

    def tensors(self) -> list[torch.Tensor]:
        alive = (ref() for ref, _ in list(self._entries.values()))
        return [tensor for tensor in alive if tensor is not None]

    def clear(self) -> None:
        self._entries.clear()

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]


_registry = _Registry()
# The DeviceInfo while patched, None otherwise; the mode reads it on every call.
_device: DeviceInfo | None = None
# What unpatch() runs to undo each replacement, in patch order.
_undo: list[Callable[[], None]] = []
_patch_lock = threading.Lock()


def _new_patch_lock() -> None:
    # A worker is forked from whatever thread asks for it; one that forked
    # while another thread held the lock would find it held forever.
    global _patch_lock
    _patch_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_patch_lock)
# Per thread: the emulated current device (torch's is per thread too) and
# whether the thread is in suspended().
_thread = threading.local()
_cuda_devices: dict[int, torch.device] = {}


# --- device arguments -------------------------------------------------------


def _info() -> DeviceInfo:
    """The DeviceInfo of the patch; the patched functions run only while there is one."""
    assert _device is not None, "zerogpu.cuda.emulation: torch is not patched"
    return _device


def _current_index() -> int:
    return getattr(_thread, "index", 0)


def _cuda_device(index: int) -> torch.device:
    device = _cuda_devices.get(index)
    if device is None:
        device = _cuda_devices[index] = torch.device("cuda", index)
    return device


def _check_ordinal(index: int) -> int:
    count = _device.count if _device is not None else 1
    if not 0 <= index < count:
        raise RuntimeError(
            f"CUDA error: invalid device ordinal: cuda:{index} was requested, but the emulated "
            f"machine has {count} GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"
        )
    return index


@functools.lru_cache(maxsize=256)
def _parse_device(text: str) -> torch.device:
    return torch.device(text)


def _is_device_argument(value: object) -> bool:
    return isinstance(value, (str, torch.device)) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _cuda_target(device: object) -> int | None:
    """The emulated cuda index a device argument names, or None for any other device.

    A bare integer means a CUDA ordinal, as it does in a CUDA build of torch;
    torch itself would resolve it through the accelerator (a driver query).
    """
    if isinstance(device, str):
        device = _parse_device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        index = device.index
        return _current_index() if index is None else _check_ordinal(index)
    if isinstance(device, int) and not isinstance(device, bool):
        return _check_ordinal(device)
    return None


def _device_index(device: object) -> int:
    """A `torch.cuda` function's device argument as an index, validated like torch does."""
    if device is None:
        return _current_index()
    if isinstance(device, torch.cuda.device):
        index = device.idx
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        if isinstance(device, str):
            device = torch.device(device)
        if not isinstance(device, torch.device):
            raise ValueError(f"Expected a torch.device or an integer, but got: {device!r}")
        if device.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        index = _current_index() if device.index is None else device.index
    count = _info().count
    if not 0 <= index < count:
        raise AssertionError(f"Invalid device id {index}: the emulated machine has {count} GPU(s)")
    return index


# --- what the mode does ------------------------------------------------------


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
        found = _registry.index(tensor)
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
            _registry.set(result, index)
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
            if _registry.index(source) != target and _same_memory(tensor, source):
                tensor = torch.Tensor.clone(tensor)
                break
        if target is not None:
            _registry.set(tensor, target)
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
    target = _cuda_target(device)
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
        target = _cuda_target(kwargs["device"])
        if target is not None:
            kwargs = {**kwargs, "device": "cpu"}
    elif rest and isinstance(rest[0], torch.Tensor):
        other = rest[0]
        target = _registry.index(other)
        if target is None and other.device.type == "cpu" and _registry.index(args[0]) is None:
            return func(*args, **kwargs)
    elif rest and _is_device_argument(rest[0]):
        target = _cuda_target(rest[0])
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
    target = _current_index() if device is None else _cuda_target(device)
    if target is None:
        raise RuntimeError(f"Invalid device, must be cuda device (got {device!r})")
    return _move(
        torch.Tensor.to,
        (self, "cpu"),
        {"non_blocking": non_blocking, "memory_format": memory_format},
        target,
    )


def _cpu(func: Callable, args: tuple, kwargs: dict) -> Any:
    if _registry.index(args[0]) is None:
        return func(*args, **kwargs)
    return _move(func, args, kwargs, None)


def _type_as(func: Callable, args: tuple, kwargs: dict) -> Any:
    # type_as moves self to other's device as well as to its dtype.
    return _move(func, args, kwargs, _registry.index(args[1]))


def _type(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Tensor.type(): names with '.cuda.' for marked tensors; 'torch.cuda.*' targets move."""
    self = args[0]
    index = _registry.index(self)
    wanted = args[1] if len(args) > 1 else kwargs.get("dtype")
    if wanted is None:
        name = func(*args, **kwargs)
        return name if index is None else name.replace("torch.", "torch.cuda.", 1)
    if isinstance(wanted, str):
        on_cuda = wanted.startswith("torch.cuda.")
        cpu_name = wanted.replace("torch.cuda.", "torch.", 1)
        rest = {key: value for key, value in kwargs.items() if key != "dtype"}
        target = (_current_index() if index is None else index) if on_cuda else None
        return _move(func, (self, cpu_name, *args[2:]), rest, target)
    return _run(func, args, kwargs)


def _parse_to(func: Callable, args: tuple, kwargs: dict) -> Any:
    """torch._C._nn._parse_to, which Module.to uses to read its arguments."""
    if "device" in kwargs and isinstance(kwargs["device"], int):
        kwargs = {**kwargs, "device": _cuda_device(_cuda_target(kwargs["device"]))}
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        args = (_cuda_device(_cuda_target(args[0])), *args[1:])
    device, dtype, non_blocking, memory_format = func(*args, **kwargs)
    if args and isinstance(args[0], torch.Tensor):
        index = _registry.index(args[0])
        if index is not None:
            device = _cuda_device(index)
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
    index = _registry.index(args[0])
    if index is not None:
        _mark_outputs(result, index, None)
    return result


def _set_data(func: Callable, args: tuple, kwargs: dict) -> None:
    # `param.data = t` moves param to t's device: Module._apply moves parameters so.
    self, data = args
    func(self, data)
    index = _registry.index(data)
    if index is None:
        _registry.discard(self)
    else:
        _registry.set(self, index)


def _device_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    index = _registry.index(args[0])
    return func(*args, **kwargs) if index is None else _cuda_device(index)


def _is_cuda_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    return func(*args, **kwargs) or _registry.index(args[0]) is not None


def _is_cpu_of(func: Callable, args: tuple, kwargs: dict) -> Any:
    return _registry.index(args[0]) is None and func(*args, **kwargs)


def _get_device(func: Callable, args: tuple, kwargs: dict) -> Any:
    index = _registry.index(args[0])
    return func(*args, **kwargs) if index is None else index


def _repr(func: Callable, args: tuple, kwargs: dict) -> Any:
    # torch's printer asks the tensor for its device: the mode must answer it,
    # so the printer (what Tensor.__repr__ calls) runs with the mode back on.
    if _registry.index(args[0]) is None:
        return func(*args, **kwargs)
    with _MODE:
        return torch._tensor_str._str(*args, **kwargs)


def _format(func: Callable, args: tuple, kwargs: dict) -> Any:
    # What Tensor.__format__ does, with its str() fallback coming back to the mode.
    self, spec = args
    if _registry.index(self) is None or (self.dim() == 0 and type(self) is torch.Tensor):
        return func(*args, **kwargs)
    with _MODE:
        return object.__format__(self, spec)


def _numpy(func: Callable, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    index = _registry.index(self)
    if index is not None and not kwargs.get("force", False):
        raise TypeError(
            f"can't convert cuda:{index} device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )
    return func(*args, **kwargs)


def _pin_memory(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Pinning needs a CUDA context; an emulated pinned copy is a plain copy."""
    self = args[0]
    if _registry.index(self) is not None:
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
        if _device is None:
            # Unpatched: threads that still hold the mode see torch unchanged.
            return func(*args, **kwargs)
        if kwargs.get("pin_memory"):
            # Pinning takes a CUDA context; emulated pinned memory is plain memory.
            kwargs = {**kwargs, "pin_memory": False}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return _run(func, args, kwargs)


_MODE = _CudaEmulation()


def _mode_active() -> bool:
    return any(
        torch._C._get_function_stack_at(position) is _MODE
        for position in range(torch._C._len_torch_function_stack())
    )


def _enter_mode() -> None:
    if not _mode_active():
        torch._C._push_on_torch_function_stack(_MODE)


def _leave_mode() -> None:
    """Take the mode off this thread's stack, wherever it is, keeping the modes above it."""
    above = []
    while torch._C._len_torch_function_stack():
        mode = torch._C._pop_torch_function_stack()
        if mode is _MODE:
            break
        above.append(mode)
    for mode in reversed(above):
        torch._C._push_on_torch_function_stack(mode)


# --- the patched functions ----------------------------------------------------


def _make_subclass_marked(original: Callable) -> Callable:
    # Parameter(t) and Buffer-like subclasses wrap t's data in a new object
    # without a torch function call; the wrapper lives where t does.
    def _make_subclass(cls, data, requires_grad=False, **kwargs):
        # The signature torch._dynamo checks when it is imported; torch names
        # the flag `require_grad`, which callers may pass by keyword.
        kwargs.setdefault("require_grad", requires_grad)
        tensor = original(cls, data, **kwargs)
        index = _registry.index(data)
        if index is not None:
            _registry.set(tensor, index)
        return tensor

    return staticmethod(_make_subclass)


def _swap_tensors_marked(original: Callable) -> Callable:
    # swap_tensors exchanges what two Python objects hold, marks included. It
    # refuses tensors with weak references, so the registry lets go first.
    @functools.wraps(original)
    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        first, second = _registry.index(t1), _registry.index(t2)
        _registry.discard(t1)
        _registry.discard(t2)
        swapped = False
        try:
            original(t1, t2)
            swapped = True
        finally:
            if swapped:
                first, second = second, first
            for tensor, index in ((t1, first), (t2, second)):
                if index is not None:
                    _registry.set(tensor, index)

    return swap_tensors


# The attribute torch.load's storages carry when their tensors are emulated cuda.
_STORAGE_INDEX = "_zerogpu_cuda_index"


def _deserialize_on_cuda(storage: torch.UntypedStorage, location: str) -> Any:
    """torch.load's deserializer for 'cuda' locations: the storage stays on the CPU.

    torch's own one copies the storage to the GPU. The storage is tagged
    instead, and the tensors rebuilt on it (_rebuild_marked) are marked.
    """
    if not location.startswith("cuda"):
        return None
    setattr(storage, _STORAGE_INDEX, _cuda_target(location))
    return storage


def _rebuild_marked(rebuild: Callable) -> Callable:
    # functools.wraps keeps the name torch.load's weights-only unpickler allows.
    @functools.wraps(rebuild)
    def rebuilt(storage, *args, **kwargs):
        tensor = rebuild(storage, *args, **kwargs)
        index = getattr(storage._untyped_storage, _STORAGE_INDEX, None)
        if index is not None:
            _registry.set(tensor, index)
        return tensor

    return rebuilt


def _bootstrap_emulated(original: Callable) -> Callable:
    # Torch function modes live in thread-local state and a new thread starts
    # with none: without this, a web server's worker thread would run request
    # handlers against the real torch. Thread.run is overridden by subclasses;
    # _bootstrap_inner is what every threading.Thread runs first.
    @functools.wraps(original)
    def _bootstrap_inner(thread: threading.Thread) -> None:
        entered = _device is not None and not _mode_active()
        if entered:
            torch._C._push_on_torch_function_stack(_MODE)
        try:
            original(thread)
        finally:
            # A mode still on the stack is released by the thread's C++
            # destructors after join() has returned; if the interpreter is
            # finalizing by then, taking the GIL there aborts the process.
            if entered:
                _leave_mode()

    return _bootstrap_inner


def _caller() -> str:
    """The torch call that reached us and where user code made it."""
    frame = sys._getframe(1).f_back
    call = None
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        module = frame.f_globals.get("__name__", "?")
        name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        call = f"{module}.{name}()"
        frame = frame.f_back
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "unknown"
    return f"{call or 'a torch operation'} (called at {where})"


_LIBRARY_DIRECTORIES = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(__file__) + os.sep,
)


def _is_library_file(filename: str) -> bool:
    return filename.startswith(_LIBRARY_DIRECTORIES)


def _refuse_cuda_init(*args: object, **kwargs: object) -> NoReturn:
    call = _caller()
    hint = ""
    if not _mode_active() and not getattr(_thread, "suspended", False):
        hint = (
            f" This thread ({threading.current_thread().name}) was started before zerogpu "
            "patched torch, so the emulation is not active in it: enable zerogpu before "
            "starting threads."
        )
    raise CudaInitialized(
        f"{call} would initialize CUDA in a process where zerogpu emulates it, and zerogpu "
        "does not emulate this call. The app's main process must never create a CUDA "
        "context (its forked workers could not use the GPU): move this call into a function "
        f"decorated with @zerogpu.GPU.{hint}"
    )


def _is_available() -> bool:
    return True


def _device_count() -> int:
    return _info().count


def _current_device() -> int:
    return _current_index()


def _set_device(device: object) -> None:
    if isinstance(device, int) and device < 0:
        return
    _thread.index = _device_index(device)


def _exchange_device(device: int) -> int:
    if device < 0:
        return -1
    previous = _current_index()
    _thread.index = _device_index(device)
    return previous


def _get_device_properties(device: object = None) -> DeviceProperties:
    _device_index(device)
    info = _info()
    return DeviceProperties(
        name=info.name,
        major=info.major,
        minor=info.minor,
        total_memory=info.total_memory,
        multi_processor_count=info.multi_processor_count,
    )


def _get_device_name(device: object = None) -> str:
    return _get_device_properties(device).name


def _get_device_capability(device: object = None) -> tuple[int, int]:
    properties = _get_device_properties(device)
    return properties.major, properties.minor


def _mem_get_info(device: object = None) -> tuple[int, int]:
    """(free, total): free is total less the emulated tensors' memory on that device."""
    index = _device_index(device)
    total = _info().total_memory
    storages = {}
    for tensor in _registry.tensors():
        if _registry.index(tensor) == index:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return max(total - sum(storages.values()), 0), total


def _synchronize(device: object = None) -> None:
    _device_index(device)


def _empty_cache() -> None:
    return None


def _set_per_process_memory_fraction(fraction: float, device: object = None) -> None:
    _device_index(device)
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if fraction < 0 or fraction > 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")


def _seeding_emulated(original: Callable) -> Callable:
    # Emulated cuda tensors draw from the CPU generator; torch's own seeding of
    # the real generators stays queued until a worker initializes CUDA.
    @functools.wraps(original)
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))
        original(seed)

    return manual_seed

# torch.cuda functions answered from the DeviceInfo, by name, and those wrapped
# (made from torch's own). Each is replaced wherever torch binds it: torch.cuda
# re-exports torch.cuda.memory's and torch.cuda.random's functions.
_CUDA_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "manual_seed": _seeding_emulated,
    "manual_seed_all": _seeding_emulated,
}
_CUDA_FUNCTIONS: dict[str, Callable] = {
    "_lazy_init": _refuse_cuda_init,
    "is_available": _is_available,
    "device_count": _device_count,
    "current_device": _current_device,
    "set_device": _set_device,
    "_exchange_device": _exchange_device,
    "_maybe_exchange_device": _exchange_device,
    "get_device_name": _get_device_name,
    "get_device_properties": _get_device_properties,
    "get_device_capability": _get_device_capability,
    "mem_get_info": _mem_get_info,
    "synchronize": _synchronize,
    "empty_cache": _empty_cache,
    "set_per_process_memory_fraction": _set_per_process_memory_fraction,
}
_CUDA_MODULES = (torch.cuda, torch.cuda.memory, torch.cuda.random)


def _replacements() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, value) for everything patch() replaces, wrapping what is there now."""
    replacements: list[tuple[Any, str, Any]] = [
        (torch._C, "_cuda_init", _refuse_cuda_init),
        (torch.Tensor, "_make_subclass", _make_subclass_marked(torch.Tensor._make_subclass)),
        (torch.utils, "swap_tensors", _swap_tensors_marked(torch.utils.swap_tensors)),
        (
            threading.Thread,
            "_bootstrap_inner",
            _bootstrap_emulated(threading.Thread._bootstrap_inner),
        ),
        (torch._utils, "_rebuild_tensor", _rebuild_marked(torch._utils._rebuild_tensor)),
        (torch._utils, "_rebuild_tensor_v3", _rebuild_marked(torch._utils._rebuild_tensor_v3)),
    ]
    for name in (*_CUDA_FUNCTIONS, *_CUDA_WRAPPERS):
        original = getattr(torch.cuda, name, None)
        if original is None:  # e.g. _maybe_exchange_device, new in torch 2.3
            continue
        if name in _CUDA_WRAPPERS:
            replacement = _CUDA_WRAPPERS[name](original)
        else:
            replacement = _CUDA_FUNCTIONS[name]
        for module in _CUDA_MODULES:
            if getattr(module, name, None) is original:
                replacements.append((module, name, replacement))
    return replacements


def _install(owner: Any, name: str, value: Any) -> None:
    if name in vars(owner):
        original = vars(owner)[name]
        _undo.append(lambda: setattr(owner, name, original))
    else:
        _undo.append(lambda: delattr(owner, name))
    setattr(owner, name, value)


def _install_deserializer() -> None:
    """Put _deserialize_on_cuda in the place of torch.load's own 'cuda' deserializer.

    The registry is a list other libraries append to, so the entry is
    replaced where it stands and put back where it stands then.
    """
    registry = torch.serialization._package_registry
    for position, (priority, tagger, deserializer) in enumerate(registry):
        if _is_cuda_deserializer(deserializer):
            ours = (priority, tagger, _deserialize_on_cuda)
            registry[position] = ours
            _undo.append(lambda: _put_back(registry, ours, (priority, tagger, deserializer)))
            return


def _is_cuda_deserializer(deserializer: Callable) -> bool:
    return (
        isinstance(deserializer, functools.partial)
        and deserializer.func is torch.serialization._deserialize
        and deserializer.args == ("cuda",)
    )


def _put_back(registry: list, ours: tuple, original: tuple) -> None:
    for position, entry in enumerate(registry):
        if entry is ours:
            registry[position] = original
            return


def _restore() -> None:
    while _undo:
        _undo.pop()()


# --- public functions ----------------------------------------------------------


def patch(device: DeviceInfo | None = None) -> None:
    """Emulate CUDA in this process, for every thread that runs from now on.

    Idempotent: a second call only makes sure the calling thread has the
    emulation. Raises CudaInitialized when CUDA is already initialized, and
    InvalidArgument when torch is already patched for another DeviceInfo.
    """
    global _device
    if device is not None and not isinstance(device, DeviceInfo):
        raise InvalidArgument(f"patch() takes a zerogpu.cuda.emulation.DeviceInfo, not {device!r}")
    with _patch_lock:
        if _device is not None:
            if device is not None and device != _device:
                raise InvalidArgument(
                    f"torch is already patched for {_device}; call unpatch() before patching "
                    f"it for {device}"
                )
            _enter_mode()
            return
        if torch.cuda.is_initialized():
            raise CudaInitialized(
                "CUDA was initialized in this process before zerogpu patched torch, so this "
                "process holds a CUDA context that its forked workers could not use. Import "
                "zerogpu before anything that uses CUDA (with ZEROGPU=1 set, or call "
                "zerogpu.enable() right after the import), or start the app with "
                "`zerogpu run app.py`, which does both first."
            )
        try:
            for owner, name, value in _replacements():
                _install(owner, name, value)
            _install_deserializer()
        except BaseException:
            _restore()
            raise
        _device = device if device is not None else DeviceInfo()
        _enter_mode()


def unpatch() -> None:
    """Give torch back exactly as it was.

    The record of emulated tensors is kept: a worker on the real cuda backend
    unpatches first, then moves the recorded tensors onto its GPU. Threads
    other than the caller may keep the mode on their stacks; unpatched, it
    passes every call through unchanged.
    """
    global _device
    with _patch_lock:
        if _device is None:
            return
        _device = None
        _restore()
        _leave_mode()
        vars(_thread).pop("index", None)


def activate() -> None:
    """Make sure the calling thread runs with the emulation, in a process already patched.

    A forked worker inherits the patch, but only the thread that forked it,
    which need not have had the emulation (a thread started before patch()).
    """
    if _device is None:
        raise InvalidArgument(
            "activate() needs torch patched in this process: call zerogpu.cuda.emulation.patch() first"
        )
    _enter_mode()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run the block in this thread with torch unpatched: emulated tensors are plain CPU tensors.

    For code that must see the data as it is, such as packing a snapshot.
    Other threads keep the emulation.
    """
    active = _mode_active()
    if active:
        _leave_mode()
    was_suspended = getattr(_thread, "suspended", False)
    _thread.suspended = True
    try:
        yield
    finally:
        _thread.suspended = was_suspended
        if active and _device is not None:
            _enter_mode()


def is_patched() -> bool:
    """Whether torch is patched in this process."""
    return _device is not None


def is_cuda(tensor: object) -> bool:
    """Whether `tensor` is an emulated cuda tensor (recorded in the registry)."""
    return isinstance(tensor, torch.Tensor) and _registry.index(tensor) is not None


def _check_emulable(tensor: object, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{what} takes a torch.Tensor, not {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise InvalidArgument(
            f"{what} takes a CPU tensor (an emulated cuda tensor keeps its data on the CPU), "
            f"not one on {tensor.device}"
        )
    return tensor


def mark(tensor: torch.Tensor, index: int = 0) -> None:
    """Record a CPU tensor as emulated cuda on device `index` (default cuda:0)."""
    with torch._C.DisableTorchFunction():
        _check_emulable(tensor, "mark()")
    count = _device.count if _device is not None else DeviceInfo().count
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise InvalidArgument(
            f"mark() got device index {index!r}, but the emulated devices are 0..{count - 1}"
        )
    _registry.set(tensor, index)


def unmark(tensor: torch.Tensor) -> None:
    """Make `tensor` a plain CPU tensor again; a tensor that was not marked is left alone."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"unmark() takes a torch.Tensor, not {type(tensor).__name__}")
    _registry.discard(tensor)


def rebind(tensor: torch.Tensor, data: torch.Tensor, *, mark: bool | None = None) -> None:
    """`tensor.data = data`, with `tensor` emulated cuda afterwards as the runtime says.

    The runtime rebinds recorded tensors to views of a snapshot or of a
    restored buffer; those views are plain tensors, and a plain `.data =`
    would move the tensor to the CPU as it does in torch. `mark=None` keeps
    `tensor` emulated cuda if it was (or if `data` is); True makes it so
    (`data` must then be a CPU tensor); False makes it a plain tensor, as for
    a worker's real GPU memory.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"rebind() takes a torch.Tensor, not {type(tensor).__name__}")
    if not isinstance(data, torch.Tensor):
        raise InvalidArgument(f"rebind() takes a torch.Tensor as data, not {type(data).__name__}")
    index = _registry.index(tensor)
    if index is None:
        index = _registry.index(data)
    if mark is None:
        mark = index is not None
    with torch._C.DisableTorchFunction():
        if mark:
            _check_emulable(data, "rebind(mark=True)")
        torch.Tensor.data.__set__(tensor, data)
    if mark:
        _registry.set(tensor, index if index is not None else _current_index())
    else:
        _registry.discard(tensor)


def live_tensors() -> list[torch.Tensor]:
    """Every live emulated cuda tensor, in the order they were first marked."""
    return _registry.tensors()


def marks() -> int:
    """How many tensors have been marked so far: unchanged means no tensor became 'cuda' since."""
    return _registry.added
