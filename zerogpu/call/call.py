"""One call of a decorated function, in the parent: steps 2, 3 and 8 of its path.

A `Call` validates and pickles the arguments (before anything is taken),
leases a device, starts or reuses a worker, reads the worker's messages
until the call ends, and then releases everything it held, on every path.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Iterator

from . import child, events, transport, worker
from .. import runtime, settings, telemetry
from ..errors import (
    AttachError,
    CallTimeout,
    Cancelled,
    InvalidArgument,
    RestoreError,
    SerializationError,
    WorkerCrashed,
)
from ..identity import current as current_identity
from ..schedule.policy import SIZES
from ..schedule.choice import scheduler
from ..schedule.leases import LeaseRequest
from .teardown import teardown
from .warm import pool

DEFAULT_DURATION = 60.0
# How long a worker asked to stop a generator may take before it is killed.
CLOSE_GRACE = 2.0
# A call given no lease within this many seconds is said to wait for a GPU (to a watch, see events.py).
QUEUE_NOTICE_AFTER = 0.5


@dataclass(frozen=True)
class Task:
    """What the decorator knows of a function: how to find it in a worker and its limits."""

    fn: Callable
    key: str
    duration: Any
    size: str
    decorator: str = "@zerogpu.GPU"  # as the author wrote it (`@spaces.GPU` under zerogpu run), for messages

    @property
    def name(self) -> str:
        return f"{getattr(self.fn, '__qualname__', self.fn)}()"


def check_duration(duration: Any, where: str) -> float:
    """A duration in seconds, from an int, a float or a timedelta; refuse anything else."""
    if isinstance(duration, timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise InvalidArgument(
            f"{where} must be a number of seconds or a datetime.timedelta, not {type(duration).__name__}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"{where} must be a positive number of seconds, not {duration!r}")
    return seconds


def check_size(size: Any) -> str:
    if size is None:
        return "large"
    if size not in SIZES:
        raise InvalidArgument(f"size must be 'large' (half a GPU) or 'xlarge' (a whole GPU), not {size!r}")
    return size


def resolve_duration(task: Task, args: tuple, kwargs: dict) -> float:
    """The call's duration: static, or computed by the duration callable from the arguments."""
    if task.duration is None:
        return DEFAULT_DURATION
    if not callable(task.duration):
        return check_duration(task.duration, "duration")
    try:
        value = task.duration(*args, **kwargs)
    except Exception as exc:
        raise InvalidArgument(
            f"the duration callable of {task.name} raised {type(exc).__name__}: {exc}; "
            "it takes the same arguments as the function and returns seconds"
        ) from exc
    if value is None:
        return DEFAULT_DURATION
    return check_duration(value, f"the duration returned for {task.name}")


class Call:
    """The life of one call, from lease to release.

    `cancel_event`, when given, lets another thread give up on the call
    (see cancel()); a call made without one cannot be cancelled.
    """

    def __init__(self, task: Task, args: tuple, kwargs: dict,
                 cancel_event: threading.Event | None = None) -> None:
        self.task = task
        self.duration = resolve_duration(task, args, kwargs)
        # Asked here, in the caller's context: a web framework's event (and its visitor) is known only there.
        self.relay, self.watch = events.watch() or (None, None)
        # Read here, once: start() may run on another thread, and a setting
        # that turns out malformed must fail before anything is taken.
        self.identity = getattr(self.watch, "identity", None) or current_identity()
        self.queue_timeout = settings.queue_timeout()
        self.grace = settings.timeout_grace()
        self.idle_timeout = settings.idle_timeout()
        # A wrapper made before zerogpu was last re-enabled finds its function again.
        runtime.functions.setdefault(task.key, task.fn)
        # The relay's state is pickled with the arguments: an object in both is one object in the worker.
        self.payload = transport.dumps((args, kwargs, getattr(self.watch, "state", None)), to_device=True)
        self.cancel_event = cancel_event
        self.lease = None
        self.worker: worker.Worker | None = None
        self.warm = False  # the worker was idle, with the weights restored, when the call came
        self.running = False  # the worker said it took the call
        self.granted = 0.0
        self.deadline: float | None = None
        self.stage = "queue"
        self.charge = True
        self.reclaimed = False  # the scheduler took the lease back: the call ran past its duration
        self.clean = False
        self.complete = False
        self.ended = False
        self._ending = threading.Lock()
        self.phases: dict[str, Any] = {}
        self.failure: BaseException | None = None  # how the call failed, for the metrics

    @property
    def cancelled(self) -> bool:
        return self.cancel_event is not None and self.cancel_event.is_set()

    def cancelled_error(self) -> Cancelled:
        return Cancelled(f"{self.task.name} was cancelled by its caller")

    # -- start --------------------------------------------------------------

    def start(self) -> None:
        """Lease a device and hand the call to a worker (a warm one when the lease has one)."""
        try:
            if self.cancelled:
                raise self.cancelled_error()
            runtime.ensure_started()
            request = LeaseRequest(self.identity, self.duration, self.task.size, self.task.key)
            asked = time.monotonic()
            with self.queue_notices():
                self.lease = scheduler().acquire(request, timeout=self.queue_timeout, cancel=self.cancel_event)
            self.granted = time.monotonic()
            scheduler().on_reclaim(self.lease, self.reclaim)
            self.phases["queue"] = self.granted - asked
            self.deadline = self.granted + self.duration + self.grace
            if self.lease.warm:
                self.worker = pool.take(self.lease)  # first: an idle worker must not outlive its lease
            if self.cancelled:
                raise self.cancelled_error()
            self.hand_over()
        except BaseException as error:
            self.charge = False  # the user's code never ran
            self.failure = error
            self.end()
            raise

    @contextlib.contextmanager
    def queue_notices(self) -> Iterator[None]:
        """Tell the watch that the call waits for a GPU (no lease after QUEUE_NOTICE_AFTER s), and when it got one."""
        if self.watch is None:
            yield
            return
        waited = threading.Event()

        def queued() -> None:
            waited.set()
            self.watch.notice("queued")

        timer = threading.Timer(QUEUE_NOTICE_AFTER, queued)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
        if waited.is_set():
            self.watch.notice("granted")

    def hand_over(self) -> None:
        """Send the call to the lease's worker; a warm one that died meanwhile is replaced."""
        if self.reclaimed:  # taken back before a worker had it (see reclaim)
            raise self.taken_back()
        if self.worker is not None:
            try:
                self.send()
                self.stage = "run"
                self.warm = True
                return
            except (EOFError, OSError):
                self.worker.kill()  # it went while idle: a fresh one takes over
        self.warm = False
        self.stage = "attach"
        self.worker = worker.spawn(self.task.key, partial(child.main, plan=self.plan()))
        self.worker.generation = runtime.generation
        if self.reclaimed:
            self.worker.interrupt()  # taken back while it was being forked: the reading loop says so
        try:
            self.send()
        except (EOFError, OSError):
            raise self.crashed(self.worker.kill(), None) from None

    def hand_over_again(self) -> None:
        self.worker = None
        self.hand_over()

    def send(self) -> None:
        # The call and its arguments in one write: one wake-up of the worker, not two.
        header = ("call", self.task.key, self.relay)
        self.worker.send_bytes(
            transport.dumps_plain(header) if self.relay is None else transport.dumps(header, to_device=True),
            self.payload,
        )

    def plan(self) -> child.Plan:
        return child.Plan(
            lease=self.lease,
            backend=runtime.backend(),
            models=runtime.models(),
            functions=runtime.functions,
            stay_warm=self.idle_timeout > 0,
        )

    # -- messages -----------------------------------------------------------

    def messages(self) -> Iterator[tuple[str, Any]]:
        """Yield ('yield', value) for each streamed value and finally ('return', value).

        Raises the call's error: the user's exception rebuilt, or the zerogpu
        error that says how the call failed. The call is ended either way.
        """
        try:
            yield from self._read()
        except BaseException as error:
            if not (self.complete and isinstance(error, GeneratorExit)):  # closed once the result came
                self.failure = error
            raise
        finally:
            self.close()

    def _read(self) -> Iterator[tuple[str, Any]]:
        outcome: tuple[str, Any] | None = None
        received: float | None = None
        # A watched call is told when it runs past its duration, before the grace runs out and it is killed.
        overtime = None if self.watch is None else self.deadline - self.grace
        while True:
            try:
                message = self.worker.receive(self.deadline if overtime is None else min(overtime, self.deadline))
            except TimeoutError:
                if overtime is not None and time.monotonic() < self.deadline:
                    overtime = None
                    if self.stage == "run":
                        self.watch.notice("overtime")
                    continue
                raise self.timed_out() from None
            if isinstance(message, worker.Exited):
                if self.reclaimed:
                    raise self.taken_back()
                if self.warm and not self.running and not self.cancelled:
                    self.hand_over_again()  # it died while idle, before it took the call
                    continue
                if self.cancelled:
                    if self.stage != "run":
                        self.charge = False
                    raise self.cancelled_error()
                if outcome is not None and outcome[0] != "exit":
                    # The worker sent everything it had to before it went.
                    break
                raise self.crashed(message, outcome)
            verb = message[0]
            if verb == "running":
                self.running = True
            elif verb == "attached":
                self.stage = "restore"
                self.phases["fork"] = message[1]["started"] - self.granted
                self.phases["attach"] = message[1]["attach_s"]
            elif verb == "ready":
                self.stage = "run"
                self.phases["restore"] = message[1]["restore_s"]
                self.phases["restore_stats"] = message[1]["restore"]
            elif verb == "failed":
                self.charge = False
                error = AttachError if message[1] == "attach" else RestoreError
                cause = transport.rebuild_exception(message[2])
                if isinstance(cause, error):
                    raise cause
                raise error(f"{self.task.name} could not start: {cause}") from cause
            elif verb == "yield":
                yield message
            elif verb == "event":
                if self.watch is not None:
                    self.watch.replay(message[1])
            elif verb in ("return", "raise", "exit"):
                outcome = message
                received = time.monotonic()
            elif verb in ("end", "closed"):
                outcome = outcome or ("return", None)
            elif verb == "done":
                self.phases["run"] = message[1]["run_s"]
                if received is not None and outcome[0] == "return":
                    self.phases["return"] = received - message[1]["finished"]
                self.clean = True
                break
        self.complete = True
        if outcome is None or outcome[0] == "exit":
            raise self.crashed(self.worker.kill(), outcome)
        if outcome[0] == "raise":
            raise transport.rebuild_exception(outcome[1])
        yield outcome

    def timed_out(self) -> Exception:
        self.worker.kill()
        limit = f"{self.duration:g} s (+{self.grace:g} s grace)"
        if self.stage == "attach":
            self.charge = False
            return AttachError(f"attaching a GPU for {self.task.name} took longer than {limit}; the worker was killed")
        if self.stage == "restore":
            self.charge = False
            return RestoreError(
                f"restoring the weights for {self.task.name} took longer than {limit}; the worker was killed"
            )
        return CallTimeout(
            f"{self.task.name} ran past its duration of {limit} and its worker was killed; "
            f"ask for more time with {self.task.decorator}(duration=...)"
        )

    def reclaim(self) -> None:
        """The scheduler took the lease back, past the call's duration and grace: the worker goes now.

        From the scheduler's thread; the thread reading the call's messages sees the worker's end."""
        self.reclaimed = True
        if self.worker is not None and not self.ended:
            self.worker.interrupt()

    def taken_back(self) -> Exception:
        return CallTimeout(
            f"{self.task.name} ran past its duration of {self.duration:g} s and the node daemon took its GPU "
            f"back, so its worker was killed; ask for more time with {self.task.decorator}(duration=...)"
        )

    def crashed(self, exited: worker.Exited, outcome: tuple | None) -> Exception:
        if outcome is not None and outcome[0] == "exit":
            message = f"{self.task.name} called sys.exit({outcome[1]}) in its worker, which then {exited.describe()}"
        else:
            where = {"attach": " while attaching its GPU", "restore": " while restoring the weights"}
            if self.stage in where:
                self.charge = False  # zerogpu's or the GPU's failure, not the user's code
            message = (
                f"the worker running {self.task.name} {exited.describe()}{where.get(self.stage, '')} "
                "before it returned a result"
            )
        return WorkerCrashed(message, exitcode=exited.exitcode, signal=exited.signal)

    # -- stop ---------------------------------------------------------------

    def close(self) -> None:
        """End the call; if the caller stopped early, ask the worker to close its generator first.

        A worker that does not answer within CLOSE_GRACE seconds is killed.
        Called by the thread that reads the call's messages, never alongside it.
        """
        try:
            if not (self.ended or self.complete or self.cancelled) and self.worker and self.worker.alive:
                self.ask_to_close()
        finally:
            self.end()

    def ask_to_close(self) -> None:
        try:
            self.worker.send(("close",))
            deadline = time.monotonic() + CLOSE_GRACE
            while True:
                message = self.worker.receive(deadline)
                if isinstance(message, worker.Exited):
                    return
                if message[0] == "done":
                    self.clean = True
                    return
        except (TimeoutError, EOFError, OSError, SerializationError):
            pass  # end() kills it

    def cancel(self) -> None:
        """The caller gave up (a cancelled task): leave the queue or kill the worker now.

        From any thread; the thread that runs the call sees it and ends the call.
        """
        if self.cancel_event is None:
            raise InvalidArgument("this call was made without a cancel event, so it cannot be cancelled")
        self.cancel_event.set()
        if self.worker is not None and not self.ended:
            self.worker.interrupt()

    def end(self) -> None:
        """Release the lease and everything the call held; safe to call more than once."""
        with self._ending:
            if self.ended:
                return
            self.ended = True
        transport.discard(self.payload)
        if self.lease is None:
            telemetry.call_ended(self.failure, self.phases, self.warm)
            return
        ending = time.monotonic()
        used = ending - self.granted
        if self.clean and self.idle_timeout > 0 and self.worker is not None and self.worker.alive:
            pool.park(self.worker, self.lease, used=used, charge=self.charge, idle_timeout=self.idle_timeout)
        elif self.worker is not None:
            # The caller has what it came for: the worker's exit, its reaping and then the
            # lease's release (charged for the time until now) happen on the teardown thread.
            teardown.submit(self.worker, clean=self.clean,
                            then=partial(scheduler().release, self.lease, used=used, charge=self.charge))
        else:
            scheduler().release(self.lease, used=used, charge=self.charge)
        self.phases["release"] = time.monotonic() - ending
        telemetry.call_ended(self.failure, self.phases, self.warm)
