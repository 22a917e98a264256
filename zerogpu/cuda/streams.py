"""Emulated CUDA streams and events: what torch.cuda.Stream, Event and their functions give while patched.

Emulated 'cuda' tensors are CPU tensors, and every op on them has finished
when it returns: a stream is only a name for an order that always holds, so
waiting, synchronizing and querying are immediate, and an event records the
moment it was recorded (elapsed_time measures real time between two).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from .emulated_devices import cuda_device, device_index

_thread = threading.local()

class Stream:
    """torch.cuda.Stream on the emulated device: work on it runs at once, in order."""

    def __init__(self, device: object = None, priority: int = 0, **kwargs: object) -> None:
        self.device = cuda_device(device_index(device))
        self.priority = priority
        self.stream_id = 0 if kwargs.get("_default") else id(self)

    @property
    def cuda_stream(self) -> int:
        return self.stream_id

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait_event(self, event: "Event") -> None:
        return None

    def wait_stream(self, stream: "Stream") -> None:
        return None

    def record_event(self, event: "Event | None" = None) -> "Event":
        event = Event() if event is None else event
        event.record(self)
        return event

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and (self.device, self.stream_id) == (other.device, other.stream_id)

    def __hash__(self) -> int:
        return hash((self.device, self.stream_id))

    def __enter__(self) -> "Stream":
        self._previous = current_stream(self.device)
        set_stream(self)
        return self

    def __exit__(self, *exc: object) -> None:
        set_stream(self._previous)

    def __repr__(self) -> str:
        return f"<torch.cuda.Stream device={self.device} cuda_stream={self.cuda_stream:#x} (zerogpu emulated)>"

class Event:
    """torch.cuda.Event on the emulated device: recorded work is already done."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        self.blocking = blocking
        self.interprocess = interprocess
        self._recorded: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self._recorded = time.perf_counter()

    def wait(self, stream: Stream | None = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: "Event") -> float:
        """Milliseconds from this event to `end_event`, as torch reports them."""
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._recorded is None or end_event._recorded is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end_event._recorded - self._recorded) * 1000.0

    def ipc_handle(self) -> bytes:
        raise RuntimeError(
            "torch.cuda.Event.ipc_handle(): zerogpu's emulated device has no interprocess events; "
            "share results between processes as tensors instead"
        )

    def __repr__(self) -> str:
        return "<torch.cuda.Event (zerogpu emulated)>"

def _streams() -> dict[int, Stream]:
    streams = getattr(_thread, "streams", None)
    if streams is None:
        streams = _thread.streams = {}
    return streams

_defaults: dict[int, Stream] = {}

def default_stream(device: object = None) -> Stream:
    index = device_index(device)
    stream = _defaults.get(index)
    if stream is None:
        stream = _defaults[index] = Stream(index, _default=True)
    return stream

def current_stream(device: object = None) -> Stream:
    index = device_index(device)
    return _streams().get(index) or default_stream(index)

def set_stream(stream: Stream | None) -> None:
    if stream is None:
        return
    if not isinstance(stream, Stream):
        raise TypeError(f"set_stream() takes a torch.cuda.Stream, not {type(stream).__name__}")
    _streams()[stream.device.index] = stream

@contextlib.contextmanager
def stream(stream: Stream | None) -> Iterator[None]:
    """`with torch.cuda.stream(s):` makes s the current stream of its device in the block."""
    if stream is None:
        yield
        return
    with stream:
        yield

def is_emulated_stream(value: object) -> bool:
    return isinstance(value, Stream)

def forget() -> None:
    """Drop this thread's current streams (unpatched: torch's own come back)."""
    vars(_thread).pop("streams", None)

# What the tables in torch_cuda install, by torch.cuda name.
STREAM_FUNCTIONS = {
    "Stream": Stream,
    "Event": Event,
    "current_stream": current_stream,
    "default_stream": default_stream,
    "set_stream": set_stream,
    "stream": stream,
}

