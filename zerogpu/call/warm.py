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
import heapq
import itertools
import threading
import time
from dataclasses import dataclass

from .. import runtime
from ..schedule.choice import scheduler
from .worker import Worker


@dataclass
class Idle:
    worker: Worker
    lease: object
    deadline: float  # time.monotonic() at which its idle time ends
    evict: object  # the callback the scheduler holds for this lease
    going: bool = False
    # Made when it starts going, set once the worker is dead: for an eviction that finds it going.
    gone: threading.Event | None = None


class WarmPool:
    """Idle workers by lease, and one thread that ends each when its idle time is up.

    Parking and taking are O(1): a taken worker's deadline stays in the heap
    until it comes up (or the heap is compacted) and is then skipped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle: dict[int, Idle] = {}
        self._deadlines: list[tuple[float, int, Idle]] = []  # a heap
        self._order = itertools.count()  # ties in the heap never compare two Idle
        self._timer: threading.Thread | None = None

    def park(self, worker: Worker, lease, *, used: float, charge: bool, idle_timeout: float) -> None:
        """End the call on `lease` but keep `worker` alive on it for `idle_timeout` seconds."""

        def evict() -> None:
            self._evict(lease.id)

        idle = Idle(worker, lease, time.monotonic() + idle_timeout, evict)
        with self._lock:
            self._idle[lease.id] = idle
        try:
            scheduler().release(lease, used=used, charge=charge, park=evict)
        except BaseException:
            self._evict(lease.id)  # not parked after all: the worker goes
            raise
        with self._lock:
            if self._idle.get(lease.id) is not idle:
                return  # evicted already
            heapq.heappush(self._deadlines, (idle.deadline, next(self._order), idle))
            if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._idle):
                self._compact()
            if self._timer is None or not self._timer.is_alive():
                self._timer = threading.Thread(target=self._serve, name="zerogpu-warm-timer", daemon=True)
                self._timer.start()
            elif self._deadlines[0][2] is idle:
                self._wake.notify()  # the timer sleeps until a later deadline

    def take(self, lease) -> Worker | None:
        """The idle worker parked on `lease`, if it is alive and current; None otherwise."""
        with self._lock:
            idle = self._idle.get(lease.id)
            if idle is None or idle.going:
                return None
            del self._idle[lease.id]
        if idle.worker.generation != runtime.generation or idle.worker.exited():
            idle.worker.kill()
            return None
        return idle.worker

    def _compact(self) -> None:
        # Under the lock: drop the deadlines of workers no longer idle.
        self._deadlines = [entry for entry in self._deadlines if self._idle.get(entry[2].lease.id) is entry[2]]
        heapq.heapify(self._deadlines)

    def _serve(self) -> None:
        with self._lock:
            while True:
                while self._deadlines and self._idle.get(self._deadlines[0][2].lease.id) is not self._deadlines[0][2]:
                    heapq.heappop(self._deadlines)  # taken or evicted since it was parked
                if not self._deadlines:
                    self._wake.wait()
                    continue
                deadline, _, idle = self._deadlines[0]
                now = time.monotonic()
                if deadline > now:
                    self._wake.wait(deadline - now)
                    continue
                heapq.heappop(self._deadlines)
                self._lock.release()
                try:
                    self._expire(idle.lease.id)
                except Exception:  # noqa: BLE001 - the timer must outlive one failed drop
                    pass
                finally:
                    self._lock.acquire()

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
                idle.going, idle.gone = True, threading.Event()
        if waiting is not None:
            waiting.wait()
            return
        self._end(idle)

    def _expire(self, lease_id: int) -> None:
        with self._lock:
            idle = self._idle.get(lease_id)
            if idle is None or idle.going:
                return
            idle.going, idle.gone = True, threading.Event()
        self._end(idle)
        scheduler().drop(idle.lease, park=idle.evict)

    def _end(self, idle: Idle) -> None:
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
