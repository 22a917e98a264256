"""Step 3, fork: the parent's side of a worker process.

A worker is a child forked for a call (or kept warm for the next call of the
same function). This module spawns workers, waits on them, kills their process
groups and reaps them, and turns a wait status into a sentence. Everything
OS-specific about child processes lives here and in `child.py`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from ..snapshot import segments
from . import transport
from ..cuda._ext import _engine

# How long a SIGKILLed worker may take to go before a background thread reaps it.
KILL_WAIT = 30.0
# Payloads up to this many bytes fit an empty socket buffer: sent at once, they never block.
SEND_AT_ONCE = 64 << 10
# How long a worker whose channel closed may take to end by itself before it is killed.
CHANNEL_GRACE = 0.5

SIGNAL_HINTS = {
    signal.SIGKILL: "perhaps out of memory",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating-point exception",
    signal.SIGILL: "illegal instruction",
}


def describe_exit(status: int) -> str:
    """A wait status as a sentence: 'killed by SIGKILL: perhaps out of memory'."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = SIGNAL_HINTS.get(number)
        return f"killed by {name}: {hint}" if hint else f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


@dataclass
class Exited:
    """What `Worker.receive` returns once the worker has died: its wait status.

    None when it did not go within KILL_WAIT seconds of SIGKILL. `channel_closed`
    when the worker closed its channel while it still ran, and was killed for it.
    """

    status: int | None
    channel_closed: bool = False

    @property
    def exitcode(self) -> int | None:
        return os.WEXITSTATUS(self.status) if self.status is not None and os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if self.status is not None and os.WIFSIGNALED(self.status) else None

    def describe(self) -> str:
        if self.channel_closed:
            return "closed its channel to the caller (so the caller killed it)"
        if self.status is None:
            return f"did not end within {KILL_WAIT:g} s of SIGKILL (stuck in the kernel?)"
        return describe_exit(self.status)


class Spawner:
    """Forks every worker from one long-lived thread that never runs torch.

    Three reasons. A child of a fork inherits the forking thread's OpenMP
    state: if that thread ever ran a parallel torch op, libgomp in the child
    waits forever for a thread pool that no longer exists; a thread that only
    forks has no pool, so the child's first parallel op builds a fresh one.
    PR_SET_PDEATHSIG fires when the thread that forked exits, not the process,
    so that thread must live as long as the process. And forks made one at a
    time by one thread know exactly which descriptors of other workers exist,
    so each new child can close them.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="zerogpu-spawner", daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], Any], abandon: Callable[[Any], None] | None = None) -> Any:
        """Run `job` on the spawner thread and give back its result or raise its error.

        If the wait is interrupted (Ctrl-C), the job still finishes, and
        `abandon` gets its result, which nobody else will.
        """
        task = Job(job)
        self._requests.put(task)
        try:
            task.done.wait()
        except BaseException:
            # The outcome is kept on the job, not in a queue, so an interrupt
            # that lands as it arrives cannot lose it.
            task.done.wait()
            if task.error is None and abandon is not None:
                abandon(task.result)
            raise
        if task.error is not None:
            raise task.error
        return task.result

    def _serve(self) -> None:
        while True:
            task = self._requests.get()
            try:
                task.result = task.job()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                task.error = exc
            task.done.set()


class Job:
    """One piece of work for the spawner thread, and its outcome."""

    __slots__ = ("job", "done", "result", "error")

    def __init__(self, job: Callable[[], Any]) -> None:
        self.job = job
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


_spawner: Spawner | None = None
_spawner_lock = threading.Lock()
_lifeline: tuple[int, int] | None = None
# The parent's ends of every live worker's socket and its pidfd. Only the
# spawner thread changes these, so a new child closes exactly the ones that
# exist: then a worker sees EOF when the parent closes its socket.
_parent_sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
_pidfds: set[int] = set()


def spawner() -> Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = Spawner()
        return _spawner


def lifeline() -> tuple[int, int]:
    """A pipe whose write end only the parent holds: EOF on it means the parent died."""
    global _lifeline
    with _spawner_lock:
        if _lifeline is None:
            _lifeline = os.pipe()
        return _lifeline


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork would stay held forever here.
    global _spawner_lock, _spawner
    _spawner_lock = threading.Lock()
    _spawner = None


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class Worker:
    """A live worker process, seen from the parent."""

    pid: int
    channel: transport.Channel
    pidfd: int
    key: str
    generation: int = 0  # of the packed models when it was forked (see runtime.generation)
    status: int | None = None
    # Set when SIGKILL did not end it in time: a background thread reaps it.
    abandoned: bool = False
    # The caller's thread and a canceller may both reap: only one may wait.
    _reaping: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Watches the socket and the pidfd for `receive`: made once, not per message.
    _selector: selectors.BaseSelector | None = field(default=None, repr=False)
    # Held while a frame is being sent, so frames never interleave (see send_bytes).
    _sending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def alive(self) -> bool:
        return self.status is None and not self.abandoned

    def send(self, obj: Any) -> None:
        with self._sending:
            self.channel.send(obj, to_device=True)

    def send_bytes(self, *payloads: bytes) -> None:
        """Send pickled messages, in one write; ones larger than a socket's buffer go from a thread of their own.

        The worker reads its arguments only once it has attached and restored:
        a blocking send of a large payload would keep the caller from its
        deadline (a stalled restore would hang it for good). The caller waits
        in `receive` instead, bounded by the deadline; killing the worker ends
        the send.
        """
        if sum(len(payload) for payload in payloads) <= SEND_AT_ONCE:
            with self._sending:
                self.channel.send_bytes(*payloads)
            return
        # Whoever takes `release` first gives `_sending` back: the thread when it is done, or this
        # caller if starting it failed or was interrupted (Ctrl-C lands in Thread.start, which may
        # or may not have started the thread by then).
        release = threading.Lock()
        self._sending.acquire()
        try:
            threading.Thread(target=self._send_in_background, args=(release, *payloads), name="zerogpu-send",
                             daemon=True).start()
        except BaseException:
            if release.acquire(blocking=False):
                self._sending.release()
            raise

    def _send_in_background(self, release: threading.Lock, *payloads: bytes) -> None:
        try:
            self.channel.send_bytes(*payloads)
        except (EOFError, OSError):
            pass  # the worker died or was killed: `receive` reports it
        finally:
            if release.acquire(blocking=False):
                self._sending.release()

    def receive(self, deadline: float | None) -> Any:
        """The worker's next message; `Exited` if it died; TimeoutError past the deadline.

        A worker that dies right after writing its last message is read to the end
        before its death is reported, so no result is lost.
        """
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector.register(self.channel.fileno(), selectors.EVENT_READ, "channel")
            self._selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        while True:
            if self.channel.buffered():  # a frame sent together with the last one may be here already
                try:
                    return self.channel.recv(timeout=0)
                except (EOFError, ConnectionError):
                    return self._channel_ended(deadline)
                except TimeoutError:
                    pass  # part of a frame: wait for the rest
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = self._selector.select(timeout)
            if not events:
                raise TimeoutError
            sources = {key.data for key, _ in events}
            if "channel" in sources:
                try:
                    return self.channel.recv(timeout=0)
                except (EOFError, ConnectionError):
                    return self._channel_ended(deadline)
                except TimeoutError:
                    pass  # a partial frame: wait for the rest
            if "exit" in sources:
                try:
                    return self.channel.recv(timeout=0)
                except (EOFError, ConnectionError, TimeoutError):
                    return self.kill()

    def _channel_ended(self, deadline: float | None) -> Exited:
        # EOF comes first from a worker on its way out: give it a moment to end by
        # itself, so its own exit status is reported; one that still runs then
        # closed its channel itself, and is killed.
        grace = CHANNEL_GRACE if deadline is None else max(0.0, min(CHANNEL_GRACE, deadline - time.monotonic()))
        if self.status is not None or self.abandoned or self._wait_exit(grace):
            return self.kill()
        exited = self.kill()
        exited.channel_closed = True
        return exited

    def exited(self) -> bool:
        """Whether the worker has died (reaping it if so), without waiting."""
        with self._reaping:
            if self.status is None:
                # Look without reaping: its group is killed while its pid is still taken.
                if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    return False
                self._reap()
        return True

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the worker to exit by itself, then make sure it is gone."""
        if self.alive:
            self._wait_exit(timeout)
        self.kill()

    def interrupt(self) -> None:
        """SIGKILL the worker's process group from any thread; its owner then reaps it."""
        if self._reaping.acquire(blocking=False):  # held: it is being reaped already
            try:
                if self.status is None:
                    kill_tree(self.pid)
            finally:
                self._reaping.release()

    def kill(self) -> Exited:
        """Kill what is left of the worker's process group, reap it and free what it held.

        The group is killed before the leader is reaped, while the leader's pid
        cannot yet be taken by another process. A worker that SIGKILL cannot end
        within KILL_WAIT seconds (stuck in the kernel, in a GPU driver call) is
        left to a background reaper rather than blocking the caller forever.
        """
        if self.abandoned:
            return Exited(None)
        with self._reaping:
            if self.status is None:
                kill_tree(self.pid)
                if not self._wait_exit(KILL_WAIT):
                    self.abandoned = True
                    threading.Thread(target=self._reap_later, name="zerogpu-reaper", daemon=True).start()
                    return Exited(None)
                self._reap()
        return Exited(self.status)

    def _wait_exit(self, timeout: float) -> bool:
        with selectors.DefaultSelector() as selector:
            selector.register(self.pidfd, selectors.EVENT_READ)
            return bool(selector.select(timeout))

    def _reap_later(self) -> None:
        with self._reaping:
            if self.status is None:
                self._reap()

    def _reap(self) -> None:
        kill_group(self.pid)  # a grandchild still in the group goes too
        _, self.status = os.waitpid(self.pid, 0)
        spawner().run(self._close_descriptors)
        segments.remove_segments_of(self.pid)

    def _close_descriptors(self) -> None:
        # On the spawner thread, so no fork sees a descriptor half closed.
        if self._selector is not None:
            self._selector.close()
        _pidfds.discard(self.pidfd)
        os.close(self.pidfd)
        self.channel.close()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL every descendant of worker `pid`, then its process group.

    A worker is a subreaper (see child.harden): what its code started and
    detached (a double fork and setsid()) is still its descendant while it
    lives, although no longer in its group. Descendants go first: killed
    after the worker, they would be handed to init.
    """
    for descendant in descendants(pid):
        try:
            os.kill(descendant, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    kill_group(pid)


def descendants(pid: int | str = "self") -> list[int]:
    """The pids below process `pid`, read from /proc (children of every thread, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    pids = [int(child) for child in children.read().split()]
            except OSError:
                continue
            found.extend(pids)
            pending.extend(pids)
    return found


def fork() -> int:
    """os.fork(), holding across it the torch mutexes a worker may need.

    Other threads vanish at a fork, but a mutex one of them held stays locked
    in the child forever: a web server's thread inside torch.randn at that
    moment would make the worker's first torch.manual_seed hang.
    """
    return _engine.fork_holding(torch_mutexes())


_torch_mutexes: list[int] | None = None
# The bytes of a pthread_mutex_t, by machine (glibc).
PTHREAD_MUTEX_SIZE = {"x86_64": 40, "aarch64": 48}


def torch_mutexes() -> list[int]:
    """The address of the mutex of torch's default CPU generator, if it can be found safely.

    torch offers no handle on it, so it is found in the generator's memory:
    the generator object holds a pointer to its C++ implementation, whose
    mutex follows the reference-count header (two or three words, by torch
    version) and is followed by the generator's device (CPU, index -1). Both
    layouts are checked, and the mutex must read as a free one, or nothing is
    held (a plain fork, with the hazard above). A layout that matches with the
    mutex taken is looked at again at the next fork (another thread may hold
    it right now); the outcome of any other search is kept.
    """
    global _torch_mutexes
    if _torch_mutexes is not None:
        return _torch_mutexes
    torch = sys.modules.get("torch")
    size = PTHREAD_MUTEX_SIZE.get(os.uname().machine)
    if torch is None or size is None:
        return []  # torch not loaded yet: try again at the next fork
    found: list[int] = []
    generator = torch.default_generator
    if type(generator).__basicsize__ >= object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        impl = ctypes.c_void_p.from_address(id(generator) + object.__basicsize__).value
        # Read nothing that is not mapped: a wrong guess must not crash the process.
        if impl and readable(impl, 24 + size + 2):
            for header in (16, 24):
                mutex = (ctypes.c_uint8 * size).from_address(impl + header)
                device = ctypes.c_uint16.from_address(impl + header + size).value
                if device == 0xFF00:  # DeviceType::CPU (0), index -1
                    if any(mutex):
                        return []  # held now: a plain fork this time
                    found = [impl + header]
                    break
    _torch_mutexes = found
    return found


def readable(address: int, length: int) -> bool:
    """Whether [address, address + length) lies in one readable mapping of this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(bound, 16) for bound in span.split("-"))
            if start <= address and address + length <= end:
                return perms.startswith("r")
    return False


def spawn(key: str, child_main: Callable[[socket.socket, int, int], NoReturn]) -> Worker:
    """Fork a worker in its own process group that runs `child_main(sock, lifeline_fd, parent_pid)`."""
    read_end, write_end = lifeline()
    return spawner().run(lambda: _fork(key, child_main, read_end, write_end), abandon=Worker.kill)


def _fork(key: str, child_main: Callable[[socket.socket, int, int], NoReturn], read_end: int,
          write_end: int) -> Worker:
    parent = os.getpid()
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = fork()
    except BaseException:
        parent_sock.close()
        child_sock.close()
        raise
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.close(write_end)
            parent_sock.close()
            for other in list(_parent_sockets):
                fd = other.detach()
                if fd >= 0:
                    os.close(fd)
            for fd in _pidfds:
                os.close(fd)
            _pidfds.clear()
            child_main(child_sock, read_end, parent)
        finally:
            os._exit(70)
    child_sock.close()
    try:
        os.setpgid(pid, pid)  # also here, so a kill right after the fork reaches the group
    except (PermissionError, ProcessLookupError):
        pass
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        kill_group(pid)
        os.waitpid(pid, 0)
        parent_sock.close()
        raise
    _parent_sockets.add(parent_sock)
    _pidfds.add(pidfd)
    return Worker(pid=pid, channel=transport.Channel(parent_sock), pidfd=pidfd, key=key)
