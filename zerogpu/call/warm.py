"""Warm workers: a worker that finished a call may idle, holding its device and weights.

The next call of the same function whose lease the scheduler hands back
(`lease.warm`) runs on it without forking or restoring again. An idle worker
is killed when its idle time ends or when the scheduler wants its device for
another call (it calls the eviction callback given at release). A worker
forked before the packed models last changed is not used again: it would
compute with weights the app no longer has.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass, field

from .. import runtime
from ..schedule.choice import scheduler
from .worker import Worker


@dataclass
class Idle:
    worker: Worker
    lease: object
    timer: threading.Timer
    evict: object  # the callback the scheduler holds for this lease
    # Set once the worker is dead, for an eviction that finds it already going.
    gone: threading.Event = field(default_factory=threading.Event)
    going: bool = False


class WarmPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[int, Idle] = {}

    def park(self, worker: Worker, lease, *, used: float, charge: bool, idle_timeout: float) -> None:
        """End the call on `lease` but keep `worker` alive on it for `idle_timeout` seconds."""
        timer = threading.Timer(idle_timeout, self._expire, args=(lease.id,))
        timer.daemon = True

        def evict() -> None:
            self._evict(lease.id)

        with self._lock:
            self._idle[lease.id] = Idle(worker, lease, timer, evict)
        try:
            scheduler().release(lease, used=used, charge=charge, park=evict)
        except BaseException:
            self._evict(lease.id)  # not parked after all: the worker goes
            raise
        timer.start()

    def take(self, lease) -> Worker | None:
        """The idle worker parked on `lease`, if it is alive and current; None otherwise."""
        with self._lock:
            idle = self._idle.get(lease.id)
            if idle is None or idle.going:
                return None
            del self._idle[lease.id]
        idle.timer.cancel()
        if idle.worker.generation != runtime.generation or idle.worker.exited():
            idle.worker.kill()
            return None
        return idle.worker

    def _evict(self, lease_id: int) -> None:
        # Called by the scheduler, which takes the capacity back once this returns:
        # so it returns only when the worker is dead, also if it was already going.
        with self._lock:
            idle = self._idle.get(lease_id)
            if idle is None:
                return
            if idle.going:
                waiting = idle.gone
            else:
                waiting = None
                idle.going = True
        if waiting is not None:
            waiting.wait()
            return
        self._end(idle)

    def _expire(self, lease_id: int) -> None:
        with self._lock:
            idle = self._idle.get(lease_id)
            if idle is None or idle.going:
                return
            idle.going = True
        self._end(idle)
        scheduler().drop(idle.lease, park=idle.evict)

    def _end(self, idle: Idle) -> None:
        idle.timer.cancel()
        idle.worker.kill()
        with self._lock:
            self._idle.pop(idle.lease.id, None)
        idle.gone.set()

    def close(self) -> None:
        """Kill every idle worker and give its lease back (at exit, and in tests)."""
        with self._lock:
            lease_ids = list(self._idle)
        for lease_id in lease_ids:
            self._expire(lease_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


pool = WarmPool()
atexit.register(pool.close)
runtime.at_disable(pool.close)
