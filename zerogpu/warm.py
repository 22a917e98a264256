"""Warm workers: a worker that finished a call may idle, holding its device and weights.

The next call of the same function whose lease the scheduler hands back
(`lease.warm`) runs on it without forking or restoring again. An idle worker
is killed when its idle time ends or when the scheduler wants its device for
another call (it calls the eviction callback given at release).
"""

from __future__ import annotations

import atexit
import threading

from .worker import Worker


class WarmPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[int, tuple[Worker, object, threading.Timer]] = {}

    def park(self, worker: Worker, lease, *, used: float, charge: bool, idle_timeout: float) -> None:
        """End the call on `lease` but keep `worker` alive on it for `idle_timeout` seconds."""
        from .scheduler import scheduler

        timer = threading.Timer(idle_timeout, self._expire, args=(lease.id,))
        timer.daemon = True
        with self._lock:
            self._idle[lease.id] = (worker, lease, timer)
        try:
            scheduler().release(lease, used=used, charge=charge, park=lambda: self._evict(lease.id))
        except BaseException:
            self._evict(lease.id)  # not parked after all: the worker goes
            raise
        timer.start()

    def take(self, lease) -> Worker | None:
        """The idle worker parked on `lease`, if it is still alive."""
        with self._lock:
            entry = self._idle.pop(lease.id, None)
        if entry is None:
            return None
        worker, _, timer = entry
        timer.cancel()
        if worker.exited():
            return None
        return worker

    def _evict(self, lease_id: int) -> None:
        # Called by the scheduler, which takes the capacity back itself.
        with self._lock:
            entry = self._idle.pop(lease_id, None)
        if entry is not None:
            entry[2].cancel()
            entry[0].kill()

    def _expire(self, lease_id: int) -> None:
        from .scheduler import scheduler

        with self._lock:
            entry = self._idle.pop(lease_id, None)
        if entry is not None:
            worker, lease, _ = entry
            worker.kill()
            scheduler().drop(lease)

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
