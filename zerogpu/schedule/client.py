"""The scheduler of an app that shares the machine's GPUs through the node daemon.

One connection per process, shared by its threads: requests carry a number
and a reader thread hands each reply to the thread that waits for it. The
same thread sends a heartbeat when the connection has been quiet, and runs
the park callback of a warm lease when the daemon asks to evict it.

Releases do not wait for their reply: the daemon handles a connection's
requests in order, so the next acquire already finds the capacity back, and
a failure is logged. A release the daemon may not have received (the
connection broke) is sent again once connected.

A forked child closes its copy of the socket at once, so that only this
process's death (not a child outliving it) tells the daemon it is gone. If the
daemon restarts, the next request connects again; the leases held meanwhile
were taken over by the new daemon and are released as usual.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from itertools import count

from .. import settings
from ..cuda.devices import Device
from ..errors import SchedulerError
from ..units import check_seconds
from .leases import CANCEL_POLL, Lease, LeaseRequest, Scheduler, check_timeout
from .protocol import MAX_REPLY, VERSION, FrameReader, decode, encode, error_from_wire, peer

log = logging.getLogger("zerogpu.schedule.scheduler")

HEARTBEAT = 1.0          # seconds of quiet after which the client says it is alive
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0     # for requests that do not wait in the queue
ANSWER_GRACE = 10.0      # how much longer than its queue timeout an acquire waits for its answer


class Pending:
    """A request waiting for its reply: a thread waits on `event`, or `on_reply` gets it."""

    __slots__ = ("rid", "message", "event", "reply", "on_reply", "lock")

    def __init__(self, rid: int, message: dict, on_reply: Callable[[Pending], None] | None) -> None:
        self.rid = rid
        self.message = message
        self.lock = threading.Lock()  # the answer goes to on_reply or to event, never to neither
        self.event = threading.Event()
        self.reply: dict | None = None   # None after event: the connection was lost
        self.on_reply = on_reply


class Link:
    """One connection to the daemon: socket, reader thread, requests in flight."""

    def __init__(self, client: DaemonClient, sock: socket.socket) -> None:
        self.client = client
        self.sock = sock
        self.pending: dict[int, Pending] = {}
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.alive = True
        self.last_sent = time.monotonic()
        self.devices: list[Device] = []
        self.thread = threading.Thread(target=self._read, name="zerogpu-daemon-link", daemon=True)

    def send(self, message: dict, on_reply: Callable[[Pending], None] | None = None) -> Pending | None:
        """Send a request; its Pending, or None when the connection is gone."""
        rid = next(self.client.ids)
        waiting = Pending(rid, message, on_reply)
        frame = encode({**message, "id": rid})
        with self.lock:
            if not self.alive:
                return None
            self.pending[rid] = waiting
        try:
            with self.send_lock:
                self.sock.sendall(frame)
                self.last_sent = time.monotonic()
        except OSError:
            self.lost()
            return None
        return waiting

    def _read(self) -> None:
        reader = FrameReader(MAX_REPLY)
        # The socket stays blocking for sends; reads wait in poll() so that a
        # quiet connection still wakes up to send its heartbeat.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        try:
            while self.alive:
                data = self.sock.recv(65536) if poller.poll(self.client.heartbeat * 1000) else None
                if data == b"":
                    return
                if data:
                    reader.feed(data)
                    for frame in reader.frames():
                        self._dispatch(decode(frame))
                if time.monotonic() - self.last_sent >= self.client.heartbeat:
                    self.send({"op": "ping"}, on_reply=ignore)
        except OSError:
            return
        except Exception:
            log.exception("the connection to the node daemon failed")
        finally:
            self.lost()

    def _dispatch(self, message: dict) -> None:
        if message.get("op") == "evict":
            self.client.evict(self, message.get("lease"))
            return
        if message.get("op") == "expired":
            self.client.expired(message.get("lease"))
            return
        with self.lock:
            waiting = self.pending.pop(message.get("id"), None)
        if waiting is not None:
            waiting.reply = message
            finish(waiting)

    def lost(self) -> None:
        """The connection is gone: every request in flight ends without a reply."""
        with self.lock:
            if not self.alive:
                return
            self.alive = False
            pending = list(self.pending.values())
            self.pending.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for waiting in pending:
            finish(waiting)
        self.client.link_lost(self)

    def forget_in_child(self) -> None:
        # After fork: close this process's copy of the socket, nothing more
        # (a shutdown would end the parent's connection too).
        self.alive = False
        self.sock.close()


def finish(waiting: Pending) -> None:
    with waiting.lock:
        on_reply = waiting.on_reply
        if on_reply is None:
            waiting.event.set()
            return
    try:
        on_reply(waiting)
    except Exception:
        log.exception("handling a reply of the node daemon failed")


def ignore(waiting: Pending) -> None:
    pass


class DaemonClient(Scheduler):
    """A Scheduler whose decisions the node daemon at `socket_path` makes."""

    def __init__(self, socket_path: str | os.PathLike, *, heartbeat: float = HEARTBEAT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.socket_path = os.fspath(socket_path)
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.ids = count(1)
        self._lock = threading.Lock()
        self._link: Link | None = None
        self._links_of: dict[int, Link] = {}   # lease id -> the connection it was granted on
        self._parks: dict[int, Callable[[], None]] = {}
        self._unsent: list[dict] = []
        self._reclaimed: set[int] = set()  # leases the daemon took back past their duration
        self._on_reclaim: dict[int, Callable[[], None]] = {}  # lease id -> what kills its call's worker
        self._closed = False
        self._pid = os.getpid()
        clients.add(self)
        self._connection()

    # -- the interface ----------------------------------------------------------------

    def acquire(self, request: LeaseRequest, *, timeout: float | None = None,
                cancel: threading.Event | None = None) -> Lease:
        timeout = settings.queue_timeout() if timeout is None else timeout
        check_timeout(timeout)
        identity = request.identity
        link = self._connection()
        waiting = link.send({
            "op": "acquire", "user": identity.user, "tier": identity.tier, "duration": request.duration,
            "size": request.size, "key": request.key, "timeout": timeout,
        })
        if waiting is None:
            raise self._unreachable()
        deadline = time.monotonic() + timeout + ANSWER_GRACE
        cancelled = False
        # The daemon answers a cancelled call with Cancelled, or with its lease
        # if it was served first (then the caller sees its cancel itself).
        try:
            while not waiting.event.wait(CANCEL_POLL if cancel is not None and not cancelled else 0.5):
                if cancel is not None and cancel.is_set() and not cancelled:
                    cancelled = True
                    link.send({"op": "cancel", "target": waiting.rid}, on_reply=ignore)
                if time.monotonic() > deadline:
                    raise SchedulerError(f"the node daemon did not answer within {timeout + ANSWER_GRACE:g} s")
        except BaseException:
            self._abandon(link, waiting)  # also when interrupted (Ctrl-C): a late lease goes back
            raise
        wire = self._answer(waiting)["lease"]
        lease = Lease(wire["id"], link.devices[wire["device"]], wire["slot"], wire["memory_fraction"],
                      request, wire["warm"])
        with self._lock:
            self._links_of[lease.id] = link
            if lease.warm:
                self._parks.pop(lease.id, None)
        return lease

    def release(self, lease: Lease, *, used: float, charge: bool = True,
                park: Callable[[], None] | None = None) -> None:
        check_seconds(used, "used")
        with self._lock:
            self._on_reclaim.pop(lease.id, None)
            reclaimed = lease.id in self._reclaimed
            if reclaimed:
                self._reclaimed.discard(lease.id)
            elif lease.id not in self._links_of:
                raise SchedulerError(f"lease {lease.id} is not held by this process: was it released twice?")
            elif park is None:
                del self._links_of[lease.id]
            else:
                self._parks[lease.id] = park
        if reclaimed:
            # The daemon has it back already, charged: a worker that was to idle on it must go.
            run_park(park, None)
            return
        message = {"op": "release", "lease": lease.id, "used": used, "charge": charge, "park": park is not None}
        try:
            link = self._connection()
        except SchedulerError as error:
            self._unpark(lease.id)
            self._keep({**message, "park": False})
            log.warning("lease %s is returned when the node daemon is back: %s", lease.id, error)
            return
        if park is not None:
            with self._lock:
                self._links_of[lease.id] = link
        if link.send(message, on_reply=self._released) is None:
            self._unpark(lease.id)
            self._keep({**message, "park": False})

    def drop(self, lease: Lease, *, park: Callable[[], None] | None = None) -> None:
        with self._lock:
            if park is not None and self._parks.get(lease.id) is not park:
                return  # given to another call, or parked again, since
            self._parks.pop(lease.id, None)
            link = self._links_of.pop(lease.id, None)
        if link is not None and link.alive:
            link.send({"op": "drop", "lease": lease.id}, on_reply=ignore)

    def status(self) -> dict:
        return self._call({"op": "status"})["status"]

    def reset_quota(self, user: str | None = None) -> int:
        """Forget today's charges of `user`, or of every account (see QuotaLedger.reset)."""
        return self._call({"op": "reset_quota", "user": user})["reset"]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            link, self._link = self._link, None
        clients.discard(self)
        if link is not None:
            link.lost()
            if link.thread is not threading.current_thread():
                link.thread.join(5)

    # -- replies that nobody waits for ----------------------------------------------------------

    def _released(self, waiting: Pending) -> None:
        lease_id = waiting.message["lease"]
        if waiting.reply is None:
            # Lost with its connection: the daemon may not have seen it.
            self._unpark(lease_id)
            self._keep({**waiting.message, "park": False})
        elif not waiting.reply.get("ok"):
            self._unpark(lease_id)
            log.warning("the node daemon refused to release lease %s: %s", lease_id,
                        error_from_wire(waiting.reply.get("error")))

    def _keep(self, message: dict) -> None:
        """Send `message` again on the next connection."""
        with self._lock:
            self._unsent.append(message)

    def _unpark(self, lease_id: int) -> None:
        """A lease that could not stay parked: its idle worker must go now."""
        with self._lock:
            park = self._parks.pop(lease_id, None)
            self._links_of.pop(lease_id, None)
        if park is not None:
            run_park(park, None)

    def on_reclaim(self, lease: Lease, callback: Callable[[], None]) -> None:
        with self._lock:
            if lease.id in self._links_of:
                self._on_reclaim[lease.id] = callback

    def expired(self, lease_id: object) -> None:
        """The daemon took back a lease that ran past its duration and grace: it is no longer ours,
        and the worker of the call that held it is killed."""
        if not isinstance(lease_id, int):
            return
        with self._lock:
            if self._links_of.pop(lease_id, None) is None:
                return
            park = self._parks.pop(lease_id, None)
            reclaimed = self._on_reclaim.pop(lease_id, None)
            self._reclaimed.add(lease_id)
        log.warning("the node daemon took back lease %s, which ran past its duration", lease_id)
        if reclaimed is not None:
            try:
                reclaimed()
            except Exception:  # noqa: BLE001 - on the connection's reader thread, which must go on
                log.exception("ending the call on lease %s, which the node daemon took back, failed", lease_id)
        if park is not None:
            threading.Thread(target=run_park, args=(park, None), name="zerogpu-evict", daemon=True).start()

    def evict(self, link: Link, lease_id: object) -> None:
        """The daemon wants an idle worker's lease back: kill the worker, then say so."""
        with self._lock:
            park = self._parks.pop(lease_id, None) if isinstance(lease_id, int) else None
            self._links_of.pop(lease_id, None)
        threading.Thread(target=run_park, args=(park, lambda: link.send({"op": "evicted", "lease": lease_id},
                                                                         on_reply=ignore)),
                         name="zerogpu-evict", daemon=True).start()

    # -- connecting ---------------------------------------------------------------------

    def _connection(self) -> Link:
        """The live connection, made (again) if needed."""
        with self._lock:
            if self._closed:
                raise SchedulerError("the scheduler is closed")
            if self._pid != os.getpid():
                raise SchedulerError("a scheduler client cannot be used in a forked child")
            if self._link is not None and self._link.alive:
                return self._link
            # Leases whose release waits to be sent are still held, as far as the daemon knows.
            held = list(self._links_of) + [m["lease"] for m in self._unsent if m["op"] == "release"]
            link = self._connect(held)
            self._link = link
            unsent, self._unsent = self._unsent, []
        for message in unsent:
            link.send(message, on_reply=self._released)
        return link

    def _connect(self, held: list[int]) -> Link:
        """Connect and say hello, naming the leases this process still holds."""
        sock = self._dial()
        try:
            _, uid = peer(sock)
            if uid != os.getuid():
                raise SchedulerError(
                    f"{self.socket_path} is served by uid {uid}, not by this user (uid {os.getuid()}): "
                    "refusing to use it"
                )
            sock.settimeout(None)
        except OSError as error:
            sock.close()
            raise self._unreachable(error) from error
        except BaseException:
            sock.close()
            raise
        link = Link(self, sock)
        link.thread.start()
        waiting = link.send({"op": "hello", "version": VERSION, "leases": held})
        if waiting is None:
            raise self._unreachable()
        reply = self._answer(waiting, REPLY_TIMEOUT)
        link.devices = [Device(**wire) for wire in reply["devices"]]
        return link

    def _dial(self) -> socket.socket:
        """A socket connected to the daemon, retried while its listen backlog is full.

        A unix socket with a timeout connects without blocking, so a daemon
        that is accepting a burst of connections answers EAGAIN at once: that
        means busy, not gone, until `connect_timeout` has passed.
        """
        deadline = time.monotonic() + self.connect_timeout
        pause = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.connect(self.socket_path)
                return sock
            except OSError as error:
                sock.close()
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise self._unreachable(error) from error
                if time.monotonic() >= deadline:
                    raise SchedulerError(
                        f"the node daemon at {self.socket_path} is busy: its queue of new connections stayed "
                        f"full for {self.connect_timeout:g} s; try again, or raise connect_timeout"
                    ) from error
            except BaseException:
                sock.close()
                raise
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)

    def _unreachable(self, error: BaseException | None = None) -> SchedulerError:
        why = f": {error}" if error is not None else ""
        return SchedulerError(
            f"cannot reach the node daemon at {self.socket_path}{why}; start it with `zerogpu serve` "
            "or unset ZEROGPU_SCHEDULER to use an embedded scheduler"
        )

    def link_lost(self, link: Link) -> None:
        """A connection ended: idle workers parked through it lost their leases with it."""
        with self._lock:
            if self._link is link:
                self._link = None
            parked = [lease_id for lease_id, on in self._links_of.items() if on is link and lease_id in self._parks]
            parks = [self._parks.pop(lease_id) for lease_id in parked]
            for lease_id in parked:
                del self._links_of[lease_id]
        for park in parks:
            threading.Thread(target=run_park, args=(park, None), name="zerogpu-evict", daemon=True).start()

    def _abandon(self, link: Link, waiting: Pending) -> None:
        """Stop waiting for an acquire: cancel it, and give back unused a lease that comes anyway."""

        def give_back(answered: Pending) -> None:
            reply = answered.reply or {}
            if reply.get("ok") and isinstance(reply.get("lease"), dict):
                link.send({"op": "release", "lease": reply["lease"].get("id"), "used": 0.0, "charge": False,
                           "park": False}, on_reply=ignore)

        with waiting.lock:
            answered = waiting.event.is_set()
            if not answered:
                waiting.on_reply = give_back  # the reader calls it when the answer comes
        if answered:
            give_back(waiting)
        else:
            link.send({"op": "cancel", "target": waiting.rid}, on_reply=ignore)

    def _call(self, message: dict) -> dict:
        """Send a request that does not queue and return its reply (errors raised)."""
        waiting = self._connection().send(message)
        if waiting is None:
            raise self._unreachable()
        return self._answer(waiting, REPLY_TIMEOUT)

    def _answer(self, waiting: Pending, timeout: float | None = None) -> dict:
        if not waiting.event.wait(timeout):
            raise SchedulerError(f"the node daemon did not answer within {timeout:g} s")
        reply = waiting.reply
        if reply is None:
            raise SchedulerError(f"lost the connection to the node daemon at {self.socket_path}")
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error"))
        return reply

    def forget_in_child(self) -> None:
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            link.forget_in_child()


def run_park(park: Callable[[], None] | None, then: Callable[[], object] | None) -> None:
    try:
        if park is not None:
            park()
    except Exception:
        log.exception("evicting an idle worker failed")
    finally:
        if then is not None:
            then()


clients: weakref.WeakSet[DaemonClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(clients):
        client.forget_in_child()
    clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
