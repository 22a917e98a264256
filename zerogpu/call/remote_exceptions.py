"""Exceptions raised in a worker, captured there and raised again in its caller.

The exception travels pickled when it survives a round trip with its type and
message intact; otherwise as its type name, message and traceback, which the
caller raises as a RemoteError. Either way the worker's formatted traceback
comes along as the cause (`RemoteTraceback`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import RemoteError, ZeroGPUError
from .messages import dumps_inline, loads
from .unpicklable import qualified_name, text_of


@dataclass
class ExceptionPayload:
    """An exception raised in the worker, as it travels to the caller."""

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None


class RemoteTraceback(ZeroGPUError):
    """The worker's formatted traceback, chained as the cause of an exception it raised."""

    def __init__(self, text: str):
        super().__init__(text)
        self.traceback = text

    def __str__(self) -> str:
        return self.traceback


def capture_exception(exc: BaseException) -> ExceptionPayload:
    """Record an exception in the worker so that the caller can raise it again.

    The exception is pickled only if it survives a round trip here with its type
    and message intact (a custom __init__ signature often does not); otherwise
    the caller gets a RemoteError with its type name, message and traceback.
    """
    message = text_of(exc)
    formatted = "".join(traceback.format_exception(exc))
    try:
        # Inline only: the round trip below loads the message, which would unlink its segments.
        pickled = dumps_inline(exc, what="exception")
        if not _same_exception(loads(pickled), type(exc), message):
            pickled = None
    except Exception:
        pickled = None
    return ExceptionPayload(qualified_name(type(exc)), message, formatted, pickled)


def rebuild_exception(payload: ExceptionPayload) -> BaseException:
    """The exception the worker raised, to raise in the caller, its traceback as cause."""
    cause = RemoteTraceback(payload.traceback)
    rebuilt: BaseException | None = None
    if payload.pickled is not None:
        try:
            candidate = loads(payload.pickled)
        except Exception:
            candidate = None
        if (
            isinstance(candidate, BaseException)
            and qualified_name(type(candidate)) == payload.type_name
            and text_of(candidate) == payload.message
        ):
            rebuilt = candidate
    if rebuilt is None:
        rebuilt = RemoteError(payload.type_name, payload.message, payload.traceback)
    rebuilt.__cause__ = cause
    return rebuilt


def _same_exception(candidate: Any, cls: type, message: str) -> bool:
    return type(candidate) is cls and text_of(candidate) == message
