"""zerogpu in a FastAPI (or any Starlette / ASGI) app.

`install(app)` adds `ZeroGPUMiddleware`, which for every request:

- runs the request's GPU calls on the visitor's account (see visitors.py):
  the app's resolver, else the user an authentication middleware put in
  `scope["user"]`, else the client's address; worked out at the first GPU
  call, so the middleware may sit outside or inside the authentication;
- turns zerogpu's errors into JSON answers `{"error": class, "detail":
  message}`: QuotaExceeded 429 and NoGPUAvailable 503, both with
  Retry-After; CallTimeout 504; InvalidArgument 400; any other zerogpu
  error (WorkerCrashed included) 500;
- cancels the request when the client disconnects: an awaited `async def`
  GPU function, a call made through `run()`, or a `stream()` loses its
  worker, the lease goes back and only the time used is charged.

`stream(values)` answers with the values of a GPU generator as they come.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..call import decorator
from ..errors import (
    CallTimeout,
    InvalidArgument,
    NoGPUAvailable,
    QuotaExceeded,
    WorkerCrashed,
    ZeroGPUError,
)
from ..identity import Deferred, Identity, acting_as
from ..schedule.choice import scheduler
from .visitors import visitor_identity

log = logging.getLogger("zerogpu.fastapi")

STATUS = (
    (QuotaExceeded, 429),
    (NoGPUAvailable, 503),
    (CallTimeout, 504),
    (WorkerCrashed, 500),
    (InvalidArgument, 400),
)
# Retry-After for NoGPUAvailable when no running call says when it ends.
RETRY_NO_GPU = 5
DISCONNECT = {"type": "http.disconnect"}
Scope = Mapping[str, Any]


def install(app: Any) -> Any:
    """Add ZeroGPUMiddleware to a Starlette or FastAPI app, before it starts; returns the app."""
    add = getattr(app, "add_middleware", None)
    if not callable(add):
        raise InvalidArgument(
            f"install() takes a Starlette or FastAPI app, not {type(app).__name__}; "
            "wrap any other ASGI app in ZeroGPUMiddleware(app)"
        )
    add(ZeroGPUMiddleware)
    return app


# -- the visitor ----------------------------------------------------------------------------


def request_identity(scope: Scope) -> Identity:
    """The identity of the request `scope` describes."""
    client = scope.get("client")
    request = Request(scope)
    return visitor_identity(request, peer=client[0] if client else None, headers=request.headers,
                            username=logged_in(scope.get("user")))


def logged_in(user: object) -> str | None:
    """The name of an authenticated starlette user (scope["user"]), if there is one."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for name in ("identity", "username", "display_name"):
        try:
            value = getattr(user, name, None)
        except NotImplementedError:  # BaseUser.identity, when the app's user class has none
            continue
        if isinstance(value, str) and value:
            return value
    return None


# -- errors -------------------------------------------------------------------------------


def status_of(error: ZeroGPUError) -> int:
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    return 500


def error_response(error: ZeroGPUError) -> JSONResponse:
    """The HTTP answer for a zerogpu error: its status, Retry-After where waiting helps, a JSON body."""
    headers = {}
    if isinstance(error, QuotaExceeded):
        retry_at = getattr(error, "retry_at", None)
        wait = retry_at - time.time() if isinstance(retry_at, (int, float)) else RETRY_NO_GPU
        headers["Retry-After"] = str(max(math.ceil(wait), 1))
    elif isinstance(error, NoGPUAvailable):
        headers["Retry-After"] = str(soonest_end())
    return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=status_of(error),
                        headers=headers)


def soonest_end() -> int:
    """Seconds until the first running call reaches its duration (a GPU may be free then)."""
    try:
        leases = scheduler().status()["leases"]
    except ZeroGPUError:
        return RETRY_NO_GPU
    left = [lease["duration"] - lease["held"] for lease in leases if lease["state"] == "running"]
    return max(math.ceil(min(left)), 1) if left else RETRY_NO_GPU


# -- the middleware ------------------------------------------------------------------------


class ZeroGPUMiddleware:
    """ASGI middleware: the visitor's identity, zerogpu's errors as HTTP answers, disconnects cancel."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        with acting_as(Deferred(lambda: request_identity(scope))):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
            else:
                await self.serve(scope, receive, send)

    async def serve(self, scope, receive, send) -> None:
        channel = Channel(scope, receive)

        async def sending(message: dict) -> None:
            channel.note_sent(message)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, channel.receive, sending))
        watcher = asyncio.ensure_future(channel.watch())
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and channel.left:
                app.cancel()  # the client is gone: its calls are cancelled with the request
            try:
                await app
            except asyncio.CancelledError:
                if channel.left:
                    return
                raise
            except ZeroGPUError as error:
                if channel.started or channel.left:
                    raise  # too late for a status: the connection ends, the client sees it broken
                log.warning("%s %s: %s: %s", scope.get("method"), scope.get("path"), type(error).__name__, error)
                await error_response(error)(scope, channel.receive, send)
        except BaseException:
            app.cancel()
            raise
        finally:
            watcher.cancel()


class Channel:
    """The request's `receive`, shared between the app and a watcher of the client's disconnect.

    The app reads the body itself (so uploads keep their back-pressure);
    once it has read all of it, or at once for a request without a body,
    the watcher waits for the one message still to come: the disconnect.
    """

    def __init__(self, scope: Scope, receive: Callable) -> None:
        self._receive = receive
        self.left = False        # the client went before the answer was complete
        self.started = False     # the answer's status line went out
        self.finished = False    # the whole answer went out
        self._gone = asyncio.Event()
        self._body_read = asyncio.Event()
        self._replay_empty = not has_body(scope)
        if self._replay_empty:
            self._body_read.set()

    def note_sent(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True

    async def receive(self) -> dict:
        if self._gone.is_set():
            return DISCONNECT
        if self._replay_empty:
            self._replay_empty = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if not self._body_read.is_set():
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._leave()
            elif not message.get("more_body", False):
                self._body_read.set()
            return message
        await self._gone.wait()
        return DISCONNECT

    async def watch(self) -> None:
        await self._body_read.wait()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                # A server also says so once the answer is complete: that is no client leaving.
                if not self.finished:
                    self._leave()
                return
            # Anything else is the empty body of a request without one, replayed to the app.

    def _leave(self) -> None:
        self.left = True
        self._gone.set()


def has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length", b"").strip()
    return b"transfer-encoding" in headers or (bool(length) and length != b"0")


# -- calls and streams ---------------------------------------------------------------------


async def run(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Await a GPU function from an `async def` endpoint: the event loop stays free, and a client
    that disconnects cancels the call (a plain function called from a `def` endpoint runs to its end)."""
    task = getattr(fn, "zerogpu", None)
    if task is None or decorator.inline():
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)
    return await decorator.run_async(task, args, kwargs)


def stream(source: Callable | Iterable | AsyncIterator, *args: Any, media_type: str = "text/plain; charset=utf-8",
           headers: Mapping[str, str] | None = None, **kwargs: Any) -> StreamingResponse:
    """Answer with the values of a GPU generator as it yields them.

    `stream(generate, prompt)` calls the GPU generator function `generate`
    itself: a client that disconnects kills its worker at once.
    `stream(values)` takes any generator or iterable, `generate(prompt)`
    included: closed when the client goes, a plain generator stops at the
    next value it yields.

    str and bytes go out as they are; other values as one JSON line each.
    The first value is awaited before the status line, so that a refused
    call (quota, no GPU) still gets its error status.
    """
    if callable(source) and not hasattr(source, "__iter__") and not hasattr(source, "__aiter__"):
        values = called(source, args, kwargs)
    elif args or kwargs:
        raise InvalidArgument("stream() passes arguments only to a function: give stream(fn, *args) "
                              "or stream(values)")
    elif isinstance(source, (str, bytes)) or not (hasattr(source, "__aiter__") or hasattr(source, "__iter__")):
        raise InvalidArgument(f"stream() takes a generator function or an iterable of values, "
                              f"not {type(source).__name__}")
    else:
        values = source
    return GPUStream(values, media_type=media_type, headers=headers)


def called(fn: Callable, args: tuple, kwargs: dict) -> Iterable | AsyncIterator:
    """The values of `fn(*args, **kwargs)`; a GPU generator's are read by a call that can be cancelled."""
    task = getattr(fn, "zerogpu", None)
    if task is not None and not decorator.inline():
        if not (inspect.isgeneratorfunction(task.fn) or inspect.isasyncgenfunction(task.fn)):
            raise InvalidArgument(f"stream() streams generator functions; {task.name} returns one value: "
                                  "return it from the endpoint instead")
        return decorator.stream_async(task, args, kwargs)
    values = fn(*args, **kwargs)
    if not (hasattr(values, "__aiter__") or hasattr(values, "__iter__")):
        raise InvalidArgument(f"stream() streams generator functions; {fn!r} returned {type(values).__name__}")
    return values


class GPUStream(StreamingResponse):
    """A StreamingResponse that starts its call before it answers, so that a refusal keeps its status."""

    def __init__(self, values: Iterable | AsyncIterator, *, media_type: str, headers: Mapping[str, str] | None):
        super().__init__(iter(()), media_type=media_type, headers=headers)
        self.values = values

    async def __call__(self, scope, receive, send) -> None:
        source = self.values.__aiter__() if hasattr(self.values, "__aiter__") else from_sync(self.values)
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            self.body_iterator = encoded(None, source, empty=True)
        except ZeroGPUError as error:
            await source.aclose()
            await error_response(error)(scope, receive, send)
            return
        except BaseException:
            await source.aclose()
            raise
        else:
            self.body_iterator = encoded(first, source)
        await super().__call__(scope, receive, send)


async def encoded(first: Any, source: AsyncIterator, *, empty: bool = False) -> AsyncIterator[bytes]:
    try:
        if not empty:
            yield encode(first)
            async for value in source:
                yield encode(value)
    finally:
        await source.aclose()


def encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return (json.dumps(value, default=str) + "\n").encode()


async def from_sync(values: Iterable) -> AsyncIterator:
    """A plain iterable (a GPU generator made by a `def` function) read on a thread of its own.

    Closing or cancelling the stream closes the generator: its worker is
    asked to stop at once, or as soon as the value it is making comes.
    """
    loop = asyncio.get_running_loop()
    given: asyncio.Queue = asyncio.Queue()
    asks: queue.SimpleQueue = queue.SimpleQueue()
    iterator = iter(values)

    def give(kind: str, value: Any = None) -> None:
        try:
            loop.call_soon_threadsafe(given.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the loop is closed: nobody waits for this any more

    def own() -> None:
        try:
            while asks.get() == "next":
                try:
                    value = next(iterator)
                except StopIteration:
                    give("end")
                    return
                give("value", value)
        except BaseException as error:  # noqa: BLE001 - handed to the reader
            give("error", error)
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()

    threading.Thread(target=contextvars.copy_context().run, args=(own,), name="zerogpu-stream",
                     daemon=True).start()
    try:
        while True:
            asks.put("next")
            kind, value = await given.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        asks.put("close")
