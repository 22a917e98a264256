"""What happened, for whoever listens: the events zerogpu.metrics turns into Prometheus metrics.

The call path and the scheduler report here, at the bottom of the package,
so that they need not import the metrics module (nor prometheus_client)
above them. With no listener (metrics never served) a report costs a look at
an empty list.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from .errors import CallTimeout, Cancelled, NoGPUAvailable, QuotaExceeded, WorkerCrashed

OUTCOMES = ("ok", "error", "crashed", "timeout", "quota", "no_gpu", "cancelled")
PHASES = ("queue", "fork", "attach", "restore", "run", "return")


class Listener(Protocol):
    def call_ended(self, outcome: str, phases: dict[str, float], warm: bool, restored_bytes: int) -> None: ...

    def quota_refused(self, tier: str) -> None: ...


_listeners: list[Listener] = []
_schedulers: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()


def listen(listener: Listener) -> None:
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def outcome_of(error: BaseException | None) -> str:
    """The outcome label of a call that ended with `error` (None: it returned)."""
    if error is None:
        return "ok"
    if isinstance(error, QuotaExceeded):
        return "quota"
    if isinstance(error, NoGPUAvailable):
        return "no_gpu"
    if isinstance(error, CallTimeout):
        return "timeout"
    if isinstance(error, WorkerCrashed):
        return "crashed"
    if isinstance(error, (Cancelled, GeneratorExit, KeyboardInterrupt)) or type(error).__name__ == "CancelledError":
        return "cancelled"
    return "error"


def call_ended(error: BaseException | None, phases: dict[str, Any], warm: bool) -> None:
    """A call ended with `error` (None: it returned), after the phases it went through."""
    if not _listeners:
        return
    outcome = outcome_of(error)
    stats = phases.get("restore_stats") or []  # one dict of figures per model restored
    restored = sum(figures.get("nbytes", 0) for figures in stats if isinstance(figures, dict))
    timed = {phase: float(phases[phase]) for phase in PHASES if isinstance(phases.get(phase), (int, float))}
    for listener in list(_listeners):
        listener.call_ended(outcome, timed, warm, int(restored or 0))


def quota_refused(tier: str) -> None:
    for listener in list(_listeners):
        listener.quota_refused(tier)


def watch(scheduler: Any) -> None:
    """Count `scheduler` in the gauges (leases held, calls waiting, busy slices); it has `gauges()`."""
    _schedulers.add(scheduler)


def schedulers() -> list[Any]:
    return list(_schedulers)
