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


def scheduler() -> Scheduler:
    """The scheduler of this process: the node daemon's client or an embedded one."""
    global _instance, _instance_pid
    chosen = _instance  # every call asks: the common case takes no lock
    if chosen is not None and _instance_pid == os.getpid():
        return chosen
    with _instance_lock:
        # A forked process must not use its parent's locks, sockets or database handle.
        if _instance is None or _instance_pid != os.getpid():
            socket_path = settings.scheduler_socket()
            _instance = DaemonClient(socket_path) if socket_path else EmbeddedScheduler()
            _instance_pid = os.getpid()
        return _instance


def use_scheduler(chosen: Scheduler) -> None:
    """Make `chosen` the scheduler of this process (e.g. an EmbeddedScheduler with its own Policy)."""
    global _instance, _instance_pid
    with _instance_lock:
        previous, _instance, _instance_pid = _instance, chosen, os.getpid()
    if previous is not None and previous is not chosen:
        previous.close()


def reset_scheduler() -> None:
    """Close the scheduler of this process; the next scheduler() call makes a new one."""
    global _instance
    with _instance_lock:
        previous, _instance = _instance, None
        same_process = _instance_pid == os.getpid()
    if previous is not None and same_process:
        previous.close()
