"""What crosses the socket between a caller and its worker: the names the rest of zerogpu uses.

    messages           a value as a message: cloudpickle, tensors' bytes beside the pickle
    storages           the span of each tensor storage a message carries, and tensors rebuilt over it
    tensor_segments    large storages through shared memory instead of the socket
    unpicklable        errors that say which part of a value cannot be pickled
    remote_exceptions  exceptions raised in the worker, raised again in the caller
    channel            messages framed over a connected socket
"""

from __future__ import annotations

from .channel import Channel
from .messages import TENSOR_SHM_THRESHOLD, discard, dumps, dumps_plain, loads, remove_segments_of, segments_of
from .remote_exceptions import ExceptionPayload, RemoteTraceback, capture_exception, rebuild_exception

__all__ = [
    "TENSOR_SHM_THRESHOLD",
    "Channel",
    "ExceptionPayload",
    "RemoteTraceback",
    "capture_exception",
    "discard",
    "dumps",
    "dumps_plain",
    "loads",
    "rebuild_exception",
    "remove_segments_of",
    "segments_of",
]
