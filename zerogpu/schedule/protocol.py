"""The node daemon's wire format: length-prefixed JSON messages, checked field by field.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON
holding one object. JSON rather than pickle because the daemon reads what
any local process sends it: a message can only ever be data. The daemon
bounds frames to MAX_FRAME bytes and checks every field's type and range
before acting on it.

Client to daemon: {"op": verb, "id": request number, ...fields}; every
request gets one reply {"id": ..., "ok": true, ...} or {"id": ..., "ok":
false, "error": {"type": ..., "message": ...}}. Daemon to client, unasked:
{"op": "evict", "lease": id}, answered with an "evicted" request, and
{"op": "expired", "lease": id}: the daemon took back a lease that ran past
its duration and grace, and the client's worker on it must go.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Iterator

from .. import errors
from ..cuda.devices import Device
from ..errors import InvalidArgument, SchedulerError, ZeroGPUError

VERSION = 1
HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024            # what the daemon accepts from a client
MAX_REPLY = 64 * 1024 * 1024     # what a client accepts from its daemon (status can be long)

# The fields of each request: name -> (kind, optional). Kinds: "int" (>= 0),
# "ints" (a list of them), "number" (finite), "str", "bool". Ranges are
# checked by the scheduler.
REQUESTS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {"version": ("int", False), "leases": ("ints", True)},
    "acquire": {
        "user": ("str", False), "tier": ("str", False), "duration": ("number", False),
        "size": ("str", False), "key": ("str", True), "timeout": ("number", True),
    },
    "cancel": {"target": ("int", False)},
    "release": {"lease": ("int", False), "used": ("number", False), "charge": ("bool", False),
                "park": ("bool", False)},
    "drop": {"lease": ("int", False)},
    "evicted": {"lease": ("int", False)},
    "ping": {},
    "status": {},
    "reset_quota": {"user": ("str", True)},
}
MAX_STRING = 1024
MAX_LIST = 4096


UCRED = struct.Struct("3i")


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket, as the kernel says (SO_PEERCRED)."""
    pid, uid, _ = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return pid, uid


def encode(message: dict) -> bytes:
    """One frame holding `message`."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frames, however the bytes arrive."""

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> Iterator[bytes]:
        """The complete frames received so far.

        Raises InvalidArgument when a frame announces more than `limit` bytes:
        the stream cannot be trusted after that, so the connection must end.
        """
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.limit:
                raise InvalidArgument(f"a message of {length} bytes is over the limit of {self.limit} bytes")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            yield frame


def reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def decode(frame: bytes) -> dict:
    """The object in a frame; InvalidArgument if it is not one."""
    try:
        message = json.loads(frame.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidArgument(f"the message is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise InvalidArgument(f"a message must be a JSON object, not {type(message).__name__}")
    return message


def request_id(message: dict) -> int | None:
    """The request number to answer to, or None if it has none usable."""
    rid = message.get("id")
    return rid if is_int(rid) else None


def parse_request(message: dict) -> tuple[str, int, dict]:
    """Check a request: its verb, its id and each of its fields. Raises InvalidArgument."""
    op = message.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise InvalidArgument(f"unknown request {str(op)[:40]!r}: use one of {', '.join(REQUESTS)}")
    rid = request_id(message)
    if rid is None:
        raise InvalidArgument("a request needs an 'id': a non-negative integer")
    fields = {}
    for name, (kind, optional) in REQUESTS[op].items():
        value = message.get(name)
        if value is None:
            if not optional:
                raise InvalidArgument(f"{op} needs the field {name!r}")
            fields[name] = None
            continue
        check_field(op, name, kind, value)
        fields[name] = value
    return op, rid, fields


def check_field(op: str, name: str, kind: str, value: object) -> None:
    if kind == "int":
        ok = is_int(value)
        wanted = "a non-negative integer"
    elif kind == "ints":
        ok = isinstance(value, list) and len(value) <= MAX_LIST and all(is_int(item) for item in value)
        wanted = f"a list of at most {MAX_LIST} non-negative integers"
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    elif kind == "str":
        ok = isinstance(value, str) and len(value) <= MAX_STRING
        wanted = f"a string of at most {MAX_STRING} characters"
    else:
        ok = isinstance(value, bool)
        wanted = "true or false"
    if not ok:
        raise InvalidArgument(f"{op}: {name!r} must be {wanted}, not {short(value)}")


def is_int(value: object) -> bool:
    # 2**53 keeps ids exact in every JSON reader.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- errors over the wire ------------------------------------------------------------------

ERROR_FIELDS = ("requested", "left", "retry_at")


def error_to_wire(error: BaseException) -> dict:
    wire = {"type": type(error).__name__ if isinstance(error, ZeroGPUError) else "SchedulerError",
            "message": str(error)}
    for name in ERROR_FIELDS:
        value = getattr(error, name, None)
        if isinstance(value, (int, float)):
            wire[name] = value
    return wire


def error_from_wire(wire: object) -> ZeroGPUError:
    """The zerogpu error a reply describes (SchedulerError if it names no known one)."""
    if not isinstance(wire, dict):
        return SchedulerError("the node daemon sent a malformed error")
    kind = getattr(errors, str(wire.get("type")), None)
    message = str(wire.get("message", ""))
    error: ZeroGPUError = SchedulerError(message)
    if isinstance(kind, type) and issubclass(kind, ZeroGPUError):
        try:
            error = kind(message)
        except TypeError:  # a class whose constructor wants more than a message
            pass
    for name in ERROR_FIELDS:
        if name in wire:
            setattr(error, name, wire[name])
    return error


def device_to_wire(device: Device) -> dict:
    """A device as plain data (the daemon's hello, and status)."""
    return {"index": device.index, "visible_id": device.visible_id, "name": device.name,
            "total_memory": device.total_memory, "backend": device.backend}
