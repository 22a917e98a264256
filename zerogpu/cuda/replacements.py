"""What patch() puts in torch's place, and putting torch back exactly as it was.

Besides the torch.cuda answers, some torch functions are wrapped so that
what they make keeps its mark: Parameter(t) and swap_tensors move a mark from
one Python object to another, torch.load rebuilds 'cuda' tensors on the CPU,
and every new thread starts with the function mode on its stack.
"""

from __future__ import annotations

import functools
import threading
import types
from typing import Any, Callable

import torch
import torch.amp.autocast_mode
import torch.export
import torch.serialization

from . import emulated_devices, streams, torch_mode
from .compiling import compile_emulated
from .accelerator import ACCELERATOR_FUNCTIONS, ACCELERATOR_MODULES
from .emulated_devices import cuda_device, cuda_target
from .generators import generator_class
from .registry import marked, marked_storages
from .torch_cuda import CUDA_FUNCTIONS, CUDA_MODULES, CUDA_WRAPPERS, refuse_cuda_init

# What restore() runs to undo each replacement, in install order.
_undo: list[Callable[[], None]] = []


def _make_subclass_marked(original: Callable) -> Callable:
    # Parameter(t) and Buffer-like subclasses wrap t's data in a new object
    # without a torch function call; the wrapper lives where t does.
    def _make_subclass(cls, data, requires_grad=False, **kwargs):
        # The signature torch._dynamo checks when it is imported; torch names
        # the flag `require_grad`, which callers may pass by keyword.
        kwargs.setdefault("require_grad", requires_grad)
        tensor = original(cls, data, **kwargs)
        index = marked.index(data)
        if index is not None:
            marked.set(tensor, index)
        return tensor

    return staticmethod(_make_subclass)


def _swap_tensors_marked(original: Callable) -> Callable:
    # swap_tensors exchanges what two Python objects hold, marks included. It
    # refuses tensors with weak references, so the registry lets go first.
    @functools.wraps(original)
    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        first, second = marked.index(t1), marked.index(t2)
        marked.discard(t1)
        marked.discard(t2)
        swapped = False
        try:
            original(t1, t2)
            swapped = True
        finally:
            if swapped:
                first, second = second, first
            for tensor, index in ((t1, first), (t2, second)):
                if index is not None:
                    marked.set(tensor, index)

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
    setattr(storage, _STORAGE_INDEX, cuda_target(location))
    return storage


def _rebuild_marked(rebuild: Callable) -> Callable:
    # functools.wraps keeps the name torch.load's weights-only unpickler allows.
    @functools.wraps(rebuild)
    def rebuilt(storage, *args, **kwargs):
        tensor = rebuild(storage, *args, **kwargs)
        index = getattr(storage._untyped_storage, _STORAGE_INDEX, None)
        if index is not None:
            marked.set(tensor, index)
        return tensor

    return rebuilt


def _bootstrap_emulated(original: Callable) -> Callable:
    # Torch function modes live in thread-local state and a new thread starts
    # with none: without this, a web server's worker thread would run request
    # handlers against the real torch. Thread.run is overridden by subclasses;
    # _bootstrap_inner is what every threading.Thread runs first.
    @functools.wraps(original)
    def _bootstrap_inner(thread: threading.Thread) -> None:
        entered = emulated_devices.patched is not None and not torch_mode.mode_active()
        if entered:
            torch_mode.enter_mode()
        try:
            original(thread)
        finally:
            # A mode still on the stack is released by the thread's C++
            # destructors after join() has returned; if the interpreter is
            # finalizing by then, taking the GIL there aborts the process.
            if entered:
                torch_mode.leave_mode()

    return _bootstrap_inner


def _autocast_emulated(original: Callable) -> Callable:
    # CUDA autocast would cast only tensors on real CUDA devices, and emulated
    # ones are CPU tensors: it becomes CPU autocast, in the dtype CUDA's would use.
    @functools.wraps(original)
    def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled=None) -> None:
        if device_type == "cuda":
            device_type = "cpu"
            if dtype is None:
                dtype = torch.get_autocast_dtype("cuda")
        original(self, device_type, dtype, enabled, cache_enabled)

    return __init__


def _storage_emulated(original: Callable) -> Callable:
    # UntypedStorage(n, device="cuda") is a CPU storage, recorded so that it
    # reports its cuda device and counts in the device's memory.
    def __new__(cls, *args, device=None, **kwargs):
        target = cuda_target(device) if device is not None else None
        if target is None:
            if device is not None:
                kwargs["device"] = device
            return original(cls, *args, **kwargs)
        storage = original(cls, *args, device="cpu", **kwargs)
        marked_storages.set(storage, target)
        return storage

    return __new__


def _storage_device(original: Any) -> property:
    def device(storage: torch.UntypedStorage) -> torch.device:
        index = marked_storages.index(storage)
        return original.__get__(storage) if index is None else cuda_device(index)

    return property(device)


def _own_copy(function: Any, name: str) -> Any:
    """A function object of its own for each name it replaces.

    torch._dynamo keeps a table keyed by torch's functions and refuses one
    function under two names (torch.cuda.current_stream and
    torch.accelerator.current_stream, memory_allocated and memory_reserved).
    """
    if not isinstance(function, types.FunctionType):
        return function
    copy = types.FunctionType(
        function.__code__, function.__globals__, name, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__doc__ = function.__doc__
    copy.__qualname__ = name
    return copy


def _export_emulated(original: Callable) -> Callable:
    # torch.export traces the model as torch.compile does: with the mode
    # suspended, emulated tensors are the CPU tensors they are.
    @functools.wraps(original)
    def export(*args, **kwargs):
        with torch_mode.suspended():
            return original(*args, **kwargs)

    return export


def _record_stream_emulated(original: Callable) -> Callable:
    # torch's argument parser refuses an emulated stream before any mode sees
    # the call; on the emulated device everything runs in order: nothing to record.
    @functools.wraps(original)
    def record_stream(tensor: torch.Tensor, stream: Any) -> None:
        if isinstance(stream, streams.Stream):
            return None
        return original(tensor, stream)

    return record_stream


def _replacements() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, value) for everything patch() replaces, wrapping what is there now."""
    replacements: list[tuple[Any, str, Any]] = [
        (torch._C, "_cuda_init", refuse_cuda_init),
        (torch.Tensor, "_make_subclass", _make_subclass_marked(torch.Tensor._make_subclass)),
        (torch.utils, "swap_tensors", _swap_tensors_marked(torch.utils.swap_tensors)),
        (
            threading.Thread,
            "_bootstrap_inner",
            _bootstrap_emulated(threading.Thread._bootstrap_inner),
        ),
        (torch._utils, "_rebuild_tensor", _rebuild_marked(torch._utils._rebuild_tensor)),
        (torch._utils, "_rebuild_tensor_v3", _rebuild_marked(torch._utils._rebuild_tensor_v3)),
        (torch, "Generator", generator_class(torch.Generator)),
        (torch, "compile", compile_emulated(torch.compile)),
        (torch.export, "export", _export_emulated(torch.export.export)),
        (torch.Tensor, "record_stream", _record_stream_emulated(torch.Tensor.record_stream)),
        (
            torch.amp.autocast_mode.autocast,
            "__init__",
            _autocast_emulated(torch.amp.autocast_mode.autocast.__init__),
        ),
        (torch.UntypedStorage, "__new__", _storage_emulated(torch.UntypedStorage.__new__)),
        (torch.UntypedStorage, "device", _storage_device(torch._C.StorageBase.device)),
    ]
    for name, replacement in ACCELERATOR_FUNCTIONS.items():
        replacement = _own_copy(replacement, name)
        for module in ACCELERATOR_MODULES:
            if hasattr(module, name):
                replacements.append((module, name, replacement))
    for name in (*CUDA_FUNCTIONS, *CUDA_WRAPPERS):
        original = getattr(torch.cuda, name, None)
        if original is None:  # e.g. _maybe_exchange_device, new in torch 2.3
            continue
        if name in CUDA_WRAPPERS:
            replacement = CUDA_WRAPPERS[name](original)
        else:
            replacement = _own_copy(CUDA_FUNCTIONS[name], name)
        for module in CUDA_MODULES:
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


def install() -> None:
    """Replace everything patch() replaces; on any failure, put back what was replaced."""
    try:
        for owner, name, value in _replacements():
            _install(owner, name, value)
        _install_deserializer()
    except BaseException:
        restore()
        raise


def restore() -> None:
    """Undo every replacement, last first."""
    while _undo:
        _undo.pop()()
