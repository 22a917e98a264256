"""Step 8, off the caller's path: a finished worker exits, is reaped, and then its lease goes back.

The caller has its result by then. One thread watches the pidfds of every
worker on its way out: a worker that ended its call cleanly is told to exit
and given EXIT_GRACE seconds to do so, anything else is killed at once. Once
a worker is reaped its lease is released, never before: the device's memory
is free when the scheduler hands the lease to another call.
"""

from __future__ import annotations

import atexit
import os
import selectors
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from .. import runtime
from .worker import KILL_WAIT, Worker

# How long a worker that finished its call may take to exit before it is killed.
EXIT_GRACE = 10.0


@dataclass
class Leaving:
    worker: Worker
    then: Callable[[], None]  # releases the lease, once the worker is gone
    deadline: float
    killed: bool = False


class Teardown:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._leaving: dict[int, Leaving] = {}  # by the worker's pidfd
        self._wake_read, self._wake_write = -1, -1
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(self, worker: Worker, *, clean: bool, then: Callable[[], None]) -> None:
        """Let `worker` go (asked to exit if `clean`, else killed), then run `then`."""
        if clean:
            try:
                worker.send(("exit",))  # a worker forked to stay warm waits for this
            except (EOFError, OSError):
                pass  # a cold worker is already on its way out
        else:
            worker.interrupt()
        if not worker.alive:  # reaped already (a crash the caller was told of)
            self._finish(worker, then)
            return
        with self._lock:
            self._start()
            self._leaving[worker.pidfd] = Leaving(worker, then, time.monotonic() + (EXIT_GRACE if clean else 0))
            self._lock.notify_all()
        os.write(self._wake_write, b"x")

    def wait(self) -> None:
        """Return once every worker handed over has gone and its lease is back."""
        with self._lock:
            while self._leaving:
                self._lock.wait()

    def __len__(self) -> int:
        with self._lock:
            return len(self._leaving)

    def _start(self) -> None:
        # Under the lock. A child of a fork has neither this thread nor its pipe.
        if self._pid != os.getpid():
            self._pid, self._thread, self._leaving = os.getpid(), None, {}
        if self._thread is None:
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_read, False)
            self._thread = threading.Thread(target=self._serve, name="zerogpu-teardown", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        watched: set[int] = set()
        while True:
            with self._lock:
                leaving = dict(self._leaving)
            for pidfd in leaving.keys() - watched:
                selector.register(pidfd, selectors.EVENT_READ, pidfd)
                watched.add(pidfd)
            now = time.monotonic()
            timeout = min((item.deadline - now for item in leaving.values()), default=None)
            ready = {key.data for key, _ in selector.select(None if timeout is None else max(0.0, timeout))}
            if None in ready:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
            now = time.monotonic()
            for pidfd, item in leaving.items():
                if pidfd in ready or (item.killed and now >= item.deadline):
                    selector.unregister(pidfd)
                    watched.discard(pidfd)
                    self._finish(item.worker, item.then)  # reaps: the pidfd is closed
                    with self._lock:
                        del self._leaving[pidfd]
                        self._lock.notify_all()
                elif now >= item.deadline:
                    item.worker.interrupt()  # it did not exit by itself
                    item.killed = True
                    item.deadline = now + KILL_WAIT

    @staticmethod
    def _finish(worker: Worker, then: Callable[[], None]) -> None:
        try:
            worker.kill()  # reaps it, and whatever of its group is left
        finally:
            try:
                then()
            except Exception:  # noqa: BLE001 - one failed release must not stop the others
                traceback.print_exc()


teardown = Teardown()
atexit.register(teardown.wait)
runtime.at_disable(teardown.wait)
