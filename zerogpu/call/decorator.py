"""`@zerogpu.GPU`: a function that holds a GPU only while it runs.

The decorator checks its arguments, registers the function so that a worker
forked later can find it, and returns a wrapper of the same kind: a plain
function, a generator, a coroutine function or an async generator. Each call
of the wrapper is a `Call` (see call.py). Inside a worker, and whenever
zerogpu is not enabled, the function runs as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import queue
import threading
from datetime import timedelta
from typing import Any, Callable, TypeVar, overload

from .. import runtime
from . import events
from .call import Call, Task, check_duration, check_size
from .child import in_worker
from ..errors import InvalidArgument

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()


@overload
def GPU(task: F) -> F: ...
@overload
def GPU(task: int | float | timedelta | str | None = None, *, duration: Any = None, size: str | None = None) -> Callable[[F], F]: ...
def GPU(task=None, *, duration=None, size=None):
    """Run the decorated function in a worker that holds a GPU only while it runs.

    duration: its time limit in seconds (int, float or timedelta), or a callable
        taking the function's arguments and returning one; shorter durations
        get a GPU sooner. Default 60 s.
    size: "large" (half a GPU, the default) or "xlarge" (a whole GPU).

    `@GPU`, `@GPU(duration=30)`, `@GPU(45)` and `@GPU("xlarge")` all work.

    Decorate at import time, after zerogpu is enabled (ZEROGPU=1 or
    zerogpu.enable()): while it is not, the function is returned unchanged.
    A decorated function is kept for the life of the process, so that any
    worker forked later can find it.
    """
    return decorator(task, duration, size, "@zerogpu.GPU")


def decorator(task: Any, duration: Any, size: str | None, name: str) -> Any:
    """GPU's work, for a decorator called `name` in messages (`@spaces.GPU` is one too)."""
    if callable(task):
        return _decorate(task, duration, size, name)
    if isinstance(task, str):
        if size is not None:
            raise InvalidArgument(f"@GPU({task!r}, size={size!r}) names the size twice: give it once")
        size = task
    elif task is not None:
        if duration is not None:
            raise InvalidArgument(f"@GPU({task!r}, duration={duration!r}) names the duration twice: give it once")
        duration = task
    check(duration, size)  # now, at decoration, not at the first call
    return functools.partial(_decorate, duration=duration, size=size, name=name)


def check(duration: Any, size: Any) -> str:
    """The size to use; InvalidArgument for a bad size or static duration."""
    if duration is not None and not callable(duration):
        check_duration(duration, "duration")
    return check_size(size)


def _decorate(fn: Callable, duration: Any, size: str | None, name: str = "@zerogpu.GPU") -> Callable:
    size = check(duration, size)
    if not callable(fn):
        raise InvalidArgument(f"{name} decorates functions, not {type(fn).__name__}")
    if not runtime.is_enabled():
        return fn
    with _lock:
        if fn in runtime.wrappers:
            return runtime.wrappers[fn]
        key = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}:{id(fn):x}"
        task = Task(fn=fn, key=key, duration=duration, size=size, decorator=name)
        wrapper = wrap(task)
        wrapper.zerogpu = task  # type: ignore[attr-defined]
        runtime.functions[key] = fn
        runtime.wrappers[fn] = runtime.wrappers[wrapper] = wrapper
        return wrapper


def wrap(task: Task) -> Callable:
    fn = task.fn
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def async_generator_wrapper(*args, **kwargs):
            if inline():
                async for value in fn(*args, **kwargs):
                    yield value
                return
            with events.translated():
                async for value in stream_async(task, args, kwargs):
                    yield value

        return async_generator_wrapper

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def coroutine_wrapper(*args, **kwargs):
            if inline():
                return await fn(*args, **kwargs)
            with events.translated():
                return await run_async(task, args, kwargs)

        return coroutine_wrapper

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            if inline():
                return (yield from fn(*args, **kwargs))
            with events.translated():
                call = Call(task, args, kwargs)
                try:
                    call.start()
                    for verb, value in call.messages():
                        if verb == "yield":
                            yield value
                finally:
                    call.close()

        return generator_wrapper

    @functools.wraps(fn)
    def function_wrapper(*args, **kwargs):
        if inline():
            return fn(*args, **kwargs)
        with events.translated():
            return run(task, args, kwargs)

    return function_wrapper


def inline() -> bool:
    """Run the function as it is: inside a worker, or once zerogpu was disabled again."""
    return in_worker() or not runtime.is_enabled()


def run(task: Task, args: tuple, kwargs: dict) -> Any:
    return finish(Call(task, args, kwargs))


def finish(call: Call) -> Any:
    """Start `call` and wait for its result; the call is ended when this returns or raises."""
    call.start()
    with contextlib.closing(call.messages()) as messages:
        for verb, value in messages:
            if verb == "return":
                return value
    raise AssertionError("a call ended without a result")  # pragma: no cover


async def run_async(task: Task, args: tuple, kwargs: dict) -> Any:
    """Await a call without blocking the event loop; cancelling it kills the worker.

    One thread makes the call (pickling its arguments too, off the event
    loop), runs it and ends it, cancelled or not: it alone reads the worker.
    """
    cancel = threading.Event()
    made: list[Call] = []

    def call() -> Any:
        made.append(Call(task, args, kwargs, cancel_event=cancel))
        return finish(made[0])

    try:
        return await in_thread(call)
    except asyncio.CancelledError:
        cancel.set()
        if made:
            made[0].cancel()
        raise


async def stream_async(task: Task, args: tuple, kwargs: dict):
    """Stream a call's values into an async generator.

    One thread owns the call, as in run_async: it reads one value each time
    the consumer asks for one, and ends the call when the stream ends, when
    the consumer stops asking ("close") or when the task is cancelled.
    """
    loop = asyncio.get_running_loop()
    values: asyncio.Queue = asyncio.Queue()
    asks: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()
    made: list[Call] = []

    def give(kind: str, value: Any = None) -> None:
        try:
            loop.call_soon_threadsafe(values.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the loop is closed: nobody waits for this any more

    def own() -> None:
        try:
            made.append(Call(task, args, kwargs, cancel_event=cancel))
            call = made[0]
            call.start()
            with contextlib.closing(call.messages()) as messages:
                while asks.get() == "next":
                    for verb, value in messages:
                        if verb == "yield":
                            give("value", value)
                            break
                    else:
                        break
                else:
                    call.close()
            give("end")
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            give("error", error)

    threading.Thread(target=contextvars.copy_context().run, args=(own,), name="zerogpu-call", daemon=True).start()
    try:
        while True:
            asks.put("next")
            kind, value = await values.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    except asyncio.CancelledError:
        cancel.set()
        if made:
            made[0].cancel()
        asks.put("close")  # in case it waits for the next ask: it sees the cancel and ends the call
        raise
    except GeneratorExit:
        # The consumer stopped between values: the owner closes the call; wait for that.
        asks.put("close")
        while (await values.get())[0] == "value":
            pass
        raise


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking step on its own thread, in the caller's context: calls may wait minutes for a GPU."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    context = contextvars.copy_context()

    def target():
        try:
            outcome = (context.run(fn), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:
            pass  # the loop is closed: the task that awaited this was cancelled and is gone

    threading.Thread(target=target, name="zerogpu-call", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
