"""Messages framed over a connected SOCK_STREAM socket: an 8-byte little-endian length, then the payload.

A payload is a message of `messages.dumps`. Frames up to SMALL_FRAME are read
into a bytearray; larger ones into an anonymous mapping, whose pages are
committed only as bytes arrive: a corrupt or lying length costs address space,
not memory.

Small reads go through a read-ahead buffer, so that the frames a peer sent
together (a result and the worker's "done") cost the reader one wake-up and one
system call, not two of each per frame; `send_bytes` writes several frames at
once for the same reason.
"""

from __future__ import annotations

import math
import mmap
import select
import socket
import struct
import threading
import time
from typing import Any

from ..errors import SerializationError
from .messages import discard, dumps, dumps_plain, loads

MAX_FRAME = 2**40
"""A frame header announcing more than this is corrupt, not a message."""

FRAME_HEADER = struct.Struct("<Q")
SMALL_FRAME = 2**20
READ_AHEAD = 2**16  # bytes asked of the socket at once for the header or a payload smaller than this


class Channel:
    """Messages over a connected SOCK_STREAM socket: an 8-byte little-endian length, then the payload.

    The channel owns the socket: it makes it blocking and closes it. Threads
    may send while another receives; their frames never interleave. A `recv` that times out in the middle of a
    frame keeps what it read, and the next `recv` goes on from there.
    """

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._header = bytearray(FRAME_HEADER.size)
        self._payload: bytearray | mmap.mmap | None = None
        self._received = 0
        self._ahead = bytearray()  # bytes read from the socket past the frame being read
        self._broken: Exception | None = None  # why the stream can no longer be read
        self._sending = threading.Lock()

    def send(self, obj: Any, *, to_device: bool, what: str = "value") -> None:
        """Pickle `obj` (see `dumps`) and send it; its segments are released if sending fails."""
        self.send_many([obj], to_device=to_device, what=what)

    def send_many(self, objs: list[Any], *, to_device: bool, what: str = "value", plain: tuple = ()) -> None:
        """Pickle each of `objs`, then each of `plain` (see `dumps_plain`), and send them as consecutive
        frames, in one write where they are small; their segments are released if pickling or sending fails."""
        payloads: list[bytes] = []
        try:
            for obj in objs:
                payloads.append(dumps(obj, to_device=to_device, what=what))
            payloads += [dumps_plain(obj) for obj in plain]
            self.send_bytes(*payloads)
        except BaseException:
            for payload in payloads:
                discard(payload)
            raise

    def send_plain(self, *objs: Any) -> None:
        """Send messages of plain data (see `dumps_plain`), in one write."""
        self.send_bytes(*(dumps_plain(obj) for obj in objs))

    def send_bytes(self, *payloads: bytes | bytearray | memoryview) -> None:
        """Send messages made earlier by `dumps` (arguments are pickled before forking), one frame each."""
        # sendall() loops over partial writes and retries on EINTR (PEP 475); MSG_NOSIGNAL
        # turns a closed peer into EPIPE even where the program restored SIGPIPE's default.
        try:
            with self._sending:
                if sum(len(payload) for payload in payloads) <= SMALL_FRAME:
                    frames = b"".join(part for payload in payloads
                                      for part in (FRAME_HEADER.pack(len(payload)), payload))
                    self._sock.sendall(frames, socket.MSG_NOSIGNAL)
                    return
                for payload in payloads:
                    self._sock.sendall(FRAME_HEADER.pack(len(payload)), socket.MSG_NOSIGNAL)
                    self._sock.sendall(payload, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EOFError("the other side of the channel has closed it") from exc

    def buffered(self) -> bool:
        """Whether bytes already read from the socket wait here: a poll of the socket would not see them."""
        return bool(self._ahead)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message's object. EOFError when the peer closed; TimeoutError when nothing came in time."""
        return loads(self.recv_bytes(timeout))

    def recv_bytes(self, timeout: float | None = None) -> bytearray | mmap.mmap:
        """The next message's payload, not yet loaded."""
        if self._broken is not None:
            raise type(self._broken)(*self._broken.args)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            target = self._header if self._payload is None else self._payload
            self._fill(target, deadline)
            if self._payload is None:
                (length,) = FRAME_HEADER.unpack(self._header)
                if length > MAX_FRAME:
                    self._broken = SerializationError(
                        f"a frame header announces {length} bytes, more than the limit of {MAX_FRAME}: "
                        "the stream is corrupt"
                    )
                    raise self._broken
                try:
                    self._payload = bytearray(length) if length <= SMALL_FRAME else mmap.mmap(-1, length)
                except (OSError, MemoryError) as exc:
                    self._broken = SerializationError(
                        f"this process cannot hold a frame of {length} bytes ({exc}); "
                        "send large data as tensors, which travel through shared memory"
                    )
                    raise self._broken from exc
                self._received = 0
            else:
                payload, self._payload, self._received = self._payload, None, 0
                return payload

    def _fill(self, target: bytearray | mmap.mmap, deadline: float | None) -> None:
        view = memoryview(target)
        while self._received < len(target):
            wanted = len(target) - self._received
            if self._ahead:
                count = min(wanted, len(self._ahead))
                view[self._received : self._received + count] = self._ahead[:count]
                del self._ahead[:count]
                self._received += count
                continue
            if deadline is not None:
                wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
                # poll() retries on EINTR with the time that is left (PEP 475).
                if not self._poller.poll(wait_ms):
                    raise TimeoutError("no message arrived in time")
            # recv() and recv_into() retry on EINTR and, after a readable poll, return at once.
            if wanted < READ_AHEAD:
                data = self._sock.recv(READ_AHEAD)
                self._ahead += data  # copied into the target at the top of the loop
                count = len(data)
            else:
                count = self._sock.recv_into(view[self._received :])
                self._received += count
            if count == 0:
                if target is self._header and self._received == 0:
                    raise EOFError("the other side of the channel has closed it")
                part = "header" if target is self._header else "payload"
                self._broken = EOFError(
                    f"the channel closed in the middle of a frame "
                    f"({self._received} of the {len(target)} bytes of its {part} arrived)"
                )
                raise self._broken

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
        self._payload = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
