"""Steps 4 to 7, in the worker: attach, restore, run, return.

`main` is what a forked worker runs, and it never returns: the worker ends
with `os._exit`, so nothing the parent registered (atexit handlers, finalizers
of objects it inherited) runs a second time here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import inspect
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, NoReturn

from ..cuda import attach, restore
from ..errors import SerializationError
from ..snapshot import packing
from . import events, transport, worker

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Rounds of killing what is left below a worker (each killed process's orphans come back to it).
DESCENDANT_ROUNDS = 64
libc = ctypes.CDLL(None, use_errno=True)  # prctl(2) has no binding in Python
EXIT_FAILED_STAGE = 3
EXIT_PARENT_GONE = 4

_in_worker = False


def in_worker() -> bool:
    """True inside a worker: a decorated function called here runs inline."""
    return _in_worker


def main(sock: socket.socket, lifeline_fd: int, parent: int, plan: "Plan") -> NoReturn:
    """Serve calls until the parent closes the socket, then exit."""
    global _in_worker
    _in_worker = True
    code = 0
    try:
        harden(lifeline_fd, parent)
        close_server_sockets(keep=sock.fileno())
        channel = transport.Channel(sock)
        if not prepare(channel, plan):
            code = EXIT_FAILED_STAGE
        else:
            serve(channel, plan)
    except (ConnectionError, EOFError):
        code = EXIT_PARENT_GONE
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # noqa: BLE001 - the worker must end here, whatever happened
        traceback.print_exc()
        code = 1
    finally:
        end_descendants()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Plan:
    """What a worker needs from its parent: the lease, the backend and the packed models."""

    def __init__(self, lease: Any, backend: str, models: list, functions: dict[str, Callable],
                 stay_warm: bool) -> None:
        self.lease = lease
        self.backend = backend
        self.models = models
        self.functions = functions
        self.stay_warm = stay_warm


def harden(lifeline_fd: int, parent: int) -> None:
    """Make sure this worker can never outlive its parent, `parent` the pid it had before the fork."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # What the call starts and detaches (double fork, setsid) is reparented here, not
    # to init, so that end_descendants (or the caller's kill_tree) still finds it.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_PARENT_GONE)
    # Belt and braces: the parent alone holds the lifeline's write end, so EOF
    # here means it is gone (PDEATHSIG fires on the forking thread's exit only).
    threading.Thread(target=_watch_lifeline, args=(lifeline_fd,), name="zerogpu-lifeline", daemon=True).start()
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(number, signal.SIG_DFL)
    # Descriptor 2 itself: sys.stderr may have none (Jupyter, click's test runner), and then
    # enable() would raise and the worker would die before its first call.
    faulthandler.enable(file=2)


def end_descendants() -> None:
    """Kill and reap every process below this worker: nothing a call started outlives it."""
    for _ in range(DESCENDANT_ROUNDS):
        pids = worker.descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # not ours to reap: its own parent, killed too, was


def _watch_lifeline(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(EXIT_PARENT_GONE)


def close_server_sockets(keep: int) -> None:
    """Close inherited listening sockets and the connections accepted on them.

    A worker must not hold a web server's port, nor its clients' connections
    (a client the server closes would otherwise get no FIN until the worker
    exits). Other sockets, such as a database connection, are left alone,
    and so is `keep`, the worker's own channel.
    """
    sockets = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == keep:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with probe:
            try:
                listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                sockets[fd] = (listening, probe.family, probe.type, local_port_or_path(probe.getsockname()))
            except OSError:
                continue
    served = {(family, address) for listening, family, _, address in sockets.values() if listening}
    for fd, (listening, family, kind, address) in sockets.items():
        if listening or (kind == socket.SOCK_STREAM and address and (family, address) in served):
            os.close(fd)


def local_port_or_path(address) -> object:
    # A server listening on 0.0.0.0:8000 accepts connections whose local
    # address is 10.0.0.5:8000: the port is what they share.
    if isinstance(address, tuple):
        return address[1]
    return address


def prepare(channel: transport.Channel, plan: Plan) -> bool:
    """Attach the leased GPU and restore the weights onto it; report each stage."""
    started = time.monotonic()
    try:
        engine = attach.attach(plan.lease, plan.backend)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        channel.send(("failed", "attach", transport.capture_exception(exc)), to_device=False)
        return False
    attached = time.monotonic()
    channel.send(("attached", {"pid": os.getpid(), "started": started, "attach_s": attached - started}),
                 to_device=False)
    try:
        late = packing.unpacked(plan.models) if plan.backend == "cuda" else []
        stats = restore.restore(plan.models, engine, plan.backend, plan.lease, late)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        channel.send(("failed", "restore", transport.capture_exception(exc)), to_device=False)
        return False
    channel.send(("ready", {"restore_s": time.monotonic() - attached, "restore": stats}), to_device=False)
    return True


def serve(channel: transport.Channel, plan: Plan) -> None:
    """Run calls as they come; a cold worker runs one, a warm one runs until EOF."""
    while True:
        try:
            message = channel.recv()
        except EOFError:
            return
        if message[0] == "exit":
            return
        if message[0] != "call":
            continue  # a "close" that crossed the end of a stream
        key, relay = message[1], message[2]
        channel.send_plain(("running",))  # the call is this worker's now
        try:
            args, kwargs, state = channel.recv()
        except (EOFError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - the caller learns why
            error = SerializationError(f"the arguments could not be rebuilt in the worker: {exc}")
            now = time.monotonic()
            channel.send_many([("raise", transport.capture_exception(error))], to_device=False,
                              plain=(done(now, now),))
        else:
            emitter = Emitter(channel)
            with emitter, events.entered(relay, state, emitter.emit):
                run(channel, plan.functions[key], args, kwargs, before_done=emitter.close)
            end_descendants()  # a warm worker's next call starts with nothing left of this one
        if not plan.stay_warm:
            return


class Emitter:
    """Sends what a relay reports from the running function as ("event", payload) messages.

    Once the call is over, a thread the function left behind can report
    nothing more: its event would arrive in the middle of the next call.
    """

    def __init__(self, channel: transport.Channel) -> None:
        self.channel = channel
        self.open = True
        self.lock = threading.Lock()

    def __enter__(self) -> Callable[[Any], None]:
        return self.emit

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Report nothing more: what comes after the call's "done" would land in the next call."""
        with self.lock:
            self.open = False

    def emit(self, payload: Any) -> None:
        with self.lock:
            if self.open:
                self.channel.send(("event", payload), to_device=False)


def run(channel: transport.Channel, fn: Callable, args: tuple, kwargs: dict,
        before_done: Callable[[], None] = lambda: None) -> None:
    """Step 6 and 7: run the user's function and send back what it returns, yields or raises.

    `before_done()` runs as soon as the function has returned or raised, before anything more is
    sent (it silences the threads the function left behind: what they report would otherwise
    land after the call's last message, in the next call)."""
    started = time.monotonic()
    try:
        try:
            result = outcome(channel, fn, args, kwargs)
        finally:
            finished = time.monotonic()
            before_done()
        reply(channel, result, done(started, finished))
    except SystemExit as exc:
        channel.send(("exit", exit_code(exc)), to_device=False)
        raise
    except MemoryError as exc:
        send_memory_error(channel, exc)
        channel.send_plain(done(started, time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - the caller gets it back
        channel.send_many([("raise", transport.capture_exception(exc))], to_device=False,
                          plain=(done(started, time.monotonic()),))


def outcome(channel: transport.Channel, fn: Callable, args: tuple, kwargs: dict) -> list[tuple]:
    """Run `fn`: the message its value makes, or none for a stream (whose values went as they came)."""
    if inspect.isasyncgenfunction(fn):
        stream(channel, iterate_async(fn(*args, **kwargs)))
        return []
    if inspect.isgeneratorfunction(fn):
        stream(channel, fn(*args, **kwargs))
        return []
    if inspect.iscoroutinefunction(fn):
        return [("return", asyncio.run(fn(*args, **kwargs)))]
    return [("return", fn(*args, **kwargs))]


def done(started: float, finished: float) -> tuple:
    """The last message of a call. `finished` is when the function returned, so the parent can
    time the return alone."""
    return ("done", {"run_s": finished - started, "finished": finished})


def send_memory_error(channel: transport.Channel, exc: MemoryError) -> None:
    """Send back a MemoryError from a worker whose memory (or address space) is exhausted.

    The traceback's frames still hold what filled it: their locals go first,
    so that pickling the error finds room. If even that fails, a bare
    MemoryError goes back without its traceback.
    """
    traceback.clear_frames(exc.__traceback__)
    try:
        channel.send(("raise", transport.capture_exception(exc)), to_device=False)
    except MemoryError:
        exc.__traceback__ = None
        channel.send(("raise", transport.capture_exception(MemoryError(*exc.args))), to_device=False)


def exit_code(exc: SystemExit) -> int:
    """The exit status sys.exit(code) gives: 0 for None, the number, else 1 (a message)."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def reply(channel: transport.Channel, messages: list[tuple], last: tuple) -> None:
    """Send the call's value (if any) and its last message, together; a value that cannot be pickled
    becomes the caller's SerializationError."""
    try:
        channel.send_many(messages, to_device=False, plain=(last,))
    except SerializationError as exc:
        channel.send_many([("raise", transport.capture_exception(exc))], to_device=False, plain=(last,))


def stream(channel: transport.Channel, generator: Iterator) -> None:
    """Send each value as it is produced; stop when the caller asks or a value cannot be sent."""
    with contextlib.closing(generator):
        for value in generator:
            try:
                channel.send(("yield", value), to_device=False)
            except SerializationError as exc:
                channel.send(("raise", transport.capture_exception(exc)), to_device=False)
                return
            if closing_requested(channel):
                channel.send(("closed",), to_device=False)
                return
    channel.send(("end",), to_device=False)


def closing_requested(channel: transport.Channel) -> bool:
    try:
        message = channel.recv(timeout=0)
    except TimeoutError:
        return False
    except EOFError:
        return True
    return message[0] == "close"


def iterate_async(agen) -> Iterator:
    """Drive an async generator from this (synchronous) worker, one value at a time."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
