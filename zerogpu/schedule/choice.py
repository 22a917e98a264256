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

_instance: Scheduler | None = None
_instance_pid = 0
_instance_lock = threading.Lock()
_chosen: tuple[Scheduler | None, int] = (None, 0)  # (_instance, _instance_pid), read without the lock


def scheduler() -> Scheduler:
    """The scheduler of this process: the node daemon's client or an embedded one."""
    global _instance, _instance_pid, _chosen
    chosen, pid = _chosen  # every call asks: the common case takes no lock (one read, one pair)
    if chosen is not None and pid == os.getpid():
        return chosen
    with _instance_lock:
        # A forked process must not use its parent's locks, sockets or database handle.
        if _instance is None or _instance_pid != os.getpid():
            socket_path = settings.scheduler_socket()
            _instance = DaemonClient(socket_path) if socket_path else EmbeddedScheduler()
            _instance_pid = os.getpid()
            _chosen = (_instance, _instance_pid)
        return _instance


def use_scheduler(chosen: Scheduler) -> None:
    """Make `chosen` the scheduler of this process (e.g. an EmbeddedScheduler with its own Policy)."""
    global _instance, _instance_pid, _chosen
    with _instance_lock:
        previous, _instance, _instance_pid = _instance, chosen, os.getpid()
        _chosen = (_instance, _instance_pid)
    if previous is not None and previous is not chosen:
        previous.close()


def reset_scheduler() -> None:
    """Close the scheduler of this process; the next scheduler() call makes a new one."""
    global _instance, _chosen
    with _instance_lock:
        previous, _instance = _instance, None
        _chosen = (None, 0)
        same_process = _instance_pid == os.getpid()
    if previous is not None and same_process:
        previous.close()
