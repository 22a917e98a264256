"""The scheduler this process uses: the node daemon's when ZEROGPU_SCHEDULER names
its socket (zerogpu.schedule.client), else an EmbeddedScheduler of its own."""

from __future__ import annotations

import os
import threading

from .. import settings
from .client import DaemonClient
from .leases import Scheduler
from .scheduler import EmbeddedScheduler

__all__ = ["scheduler", "use_scheduler", "reset_scheduler"]

# The scheduler and the pid of the process that made it, as one pair: read without the lock
# by every call, replaced under it.
_chosen: tuple[Scheduler | None, int] = (None, 0)
_lock = threading.Lock()


def scheduler() -> Scheduler:
    """The scheduler of this process: the node daemon's client or an embedded one."""
    global _chosen
    chosen, pid = _chosen
    if chosen is not None and pid == os.getpid():
        return chosen
    with _lock:
        # A forked process must not use its parent's locks, sockets or database handle.
        chosen, pid = _chosen
        if chosen is None or pid != os.getpid():
            socket_path = settings.scheduler_socket()
            chosen = DaemonClient(socket_path) if socket_path else EmbeddedScheduler()
            _chosen = (chosen, os.getpid())
        return chosen


def use_scheduler(chosen: Scheduler) -> None:
    """Make `chosen` the scheduler of this process (e.g. an EmbeddedScheduler with its own Policy)."""
    global _chosen
    with _lock:
        (previous, _), _chosen = _chosen, (chosen, os.getpid())
    if previous is not None and previous is not chosen:
        previous.close()


def reset_scheduler() -> None:
    """Close the scheduler of this process; the next scheduler() call makes a new one."""
    global _chosen
    with _lock:
        (previous, pid), _chosen = _chosen, (None, 0)
    if previous is not None and pid == os.getpid():
        previous.close()
