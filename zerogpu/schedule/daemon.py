"""The node daemon: one scheduler for every app of the machine, on a unix socket.

`zerogpu serve` runs serve(); apps whose ZEROGPU_SCHEDULER names the socket
use it through zerogpu.schedule.client. The socket is mode 0600 and every
connection's peer must run as the daemon's own user (SO_PEERCRED).

Each connection has a thread that reads its requests (zerogpu.schedule.protocol) and
answers them; calls that must wait are answered when the scheduler serves
them. A client that closes its connection, dies, or sends nothing (not even
its heartbeat) for `heartbeat_timeout` seconds loses what it held: its leases
return uncharged and its waiting calls leave the queue.

Quota reservations live in the ledger, so a daemon that stops (or crashes)
loses no record: the next one takes over the leases of clients still alive
and they release them as usual once they reconnect.

A daemon is a node of its ledger's fleet (several, with a PostgreSQL
ledger): it enters its name, GPUs and slices in the ledger and its ledger
renews a heartbeat and its reservations' expiry every third of
`node_timeout`. A node that stops renewing (killed, powered off) leaves the
fleet view and its reservations expire: their quota comes back.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import settings
from ..cuda.devices import Device, discover
from ..errors import Cancelled, InvalidArgument, SchedulerError, ZeroGPUError
from ..identity import Identity
from .policy import Policy
from .leases import Lease, LeaseRequest, Waiter
from .protocol import (
    MAX_FRAME, VERSION, FrameReader, decode, device_to_wire, encode, error_to_wire, parse_request, peer,
    request_id,
)
from .ledger import open_ledger
from .quota import Owner
from .scheduler import EmbeddedScheduler

log = logging.getLogger("zerogpu.schedule.daemon")

HEARTBEAT_TIMEOUT = 5.0   # seconds of silence after which a client counts as dead
EVICT_TIMEOUT = 5.0       # seconds a client has to kill an idle worker when asked
TICK = 0.1                # how often queue timeouts are checked
MAX_WAITING = 4096        # calls one client may have in the queue at once
SWEEP_EVERY = 2.0         # how often dead processes' leases are looked for
OUTBOX = 1024             # frames waiting to be written to one client before it is dropped
DRAIN_TIMEOUT = 1.0       # seconds a closing connection's writer has to send its last replies
RECLAIM_GRACE = 30.0      # seconds past its duration after which a running lease is taken back
NODE_TIMEOUT = 15.0       # seconds without a heartbeat after which a node's reservations expire


def orphan(process: Owner) -> tuple[str, Owner]:
    """The owner of a lease taken over from a previous daemon, until its client reconnects."""
    return ("orphan", process)


class Connection:
    """One client: its socket, its thread, the calls it waits for and the evictions asked of it."""

    def __init__(self, daemon: Daemon, sock: socket.socket, process: Owner) -> None:
        self.daemon = daemon
        self.sock = sock
        self.process = process
        # Written by a thread of its own: a client that stops reading delays nobody else,
        # and one that falls OUTBOX frames behind is dropped.
        self._outbox: queue.Queue[bytes | None] = queue.Queue(OUTBOX)
        self._writer = threading.Thread(target=self._write, name=f"zerogpu-client-{process.pid}-writer", daemon=True)
        self._lock = threading.Lock()
        self._waiting: dict[int, Waiter] = {}
        self._evictions: dict[int, threading.Event] = {}
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=f"zerogpu-client-{process.pid}", daemon=True)

    def __repr__(self) -> str:
        return f"<client pid {self.process.pid}>"

    # -- reading -----------------------------------------------------------------------

    def _run(self) -> None:
        reader = FrameReader(MAX_FRAME)
        self.sock.settimeout(self.daemon.heartbeat_timeout)
        self._writer.start()
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    log.warning("%s sent nothing for %g s: taking back its leases", self,
                                self.daemon.heartbeat_timeout)
                    return
                except OSError:
                    return
                if not data:
                    return
                reader.feed(data)
                try:
                    for frame in reader.frames():
                        self._handle(frame)
                except InvalidArgument as error:  # an oversized frame: the stream is lost
                    self.send({"id": None, "ok": False, "error": error_to_wire(error)})
                    return
        finally:
            self.close(drain=True)
            self.daemon.forget(self)

    def _handle(self, frame: bytes) -> None:
        rid = None
        try:
            message = decode(frame)
            rid = request_id(message)
            op, rid, fields = parse_request(message)
            reply = getattr(self, f"_on_{op}")(rid, **fields)
        except ZeroGPUError as error:
            reply = {"ok": False, "error": error_to_wire(error)}
        except Exception as error:  # never let one request take the daemon down
            log.exception("request from %s failed", self)
            reply = {"ok": False, "error": error_to_wire(SchedulerError(f"the node daemon failed: {error}"))}
        if reply is not None:
            self.send({"id": rid, **reply})

    # -- requests ----------------------------------------------------------------------

    def _on_hello(self, rid: int, version: int, leases: list[int] | None) -> dict:
        if version != VERSION:
            raise InvalidArgument(f"this node daemon speaks protocol {VERSION}, not {version}: "
                                  "use the same zerogpu version for the daemon and its apps")
        scheduler = self.daemon.scheduler
        # A client reconnecting after a restart says which leases it still
        # holds: those a previous daemon granted become this connection's, and
        # the rest (granted while the answer was lost) come back.
        scheduler.transfer(orphan(self.process), self, only=set(leases or ()))
        scheduler.abandon(orphan(self.process))
        return {
            "ok": True, "pid": os.getpid(),
            "devices": [device_to_wire(d) for d in scheduler.devices],
            "policy": scheduler.policy.describe(),
        }

    def _on_acquire(self, rid: int, user: str, tier: str, duration: float, size: str,
                    key: str | None, timeout: float | None) -> dict | None:
        request = LeaseRequest(Identity(user, tier), duration, size, key)
        timeout = settings.queue_timeout() if timeout is None else timeout
        with self._lock:
            if len(self._waiting) >= MAX_WAITING:
                raise SchedulerError(f"this client already has {MAX_WAITING} calls waiting for a GPU")
        waiter = self.daemon.scheduler.submit(
            request, timeout=timeout, owner=self, process=self.process,
            on_done=lambda waiter: self._served(rid, waiter),
        )
        # Whichever of this thread and _served sees the call done first answers it.
        with self._lock:
            if waiter.lease is None and waiter.error is None:
                self._waiting[rid] = waiter
                return None
        if waiter.lease is not None:
            return {"ok": True, "lease": lease_to_wire(waiter.lease)}
        raise waiter.error

    def _served(self, rid: int, waiter: Waiter) -> None:
        with self._lock:
            if self._waiting.pop(rid, None) is None:
                return  # answered by _on_acquire
        if waiter.error is not None:
            self.send({"id": rid, "ok": False, "error": error_to_wire(waiter.error)})
        else:
            self.send({"id": rid, "ok": True, "lease": lease_to_wire(waiter.lease)})

    def _on_cancel(self, rid: int, target: int) -> dict:
        with self._lock:
            waiter = self._waiting.get(target)
        if waiter is not None:
            self.daemon.scheduler.withdraw(waiter, Cancelled("the call left the GPU queue: its caller gave up"))
        return {"ok": True}

    def _on_release(self, rid: int, lease: int, used: float, charge: bool, park: bool) -> dict:
        held = self._lease(lease)
        self.daemon.scheduler.release(held, used=used, charge=charge,
                                      park=(lambda: self.evict(lease)) if park else None)
        return {"ok": True}

    def _on_drop(self, rid: int, lease: int) -> dict:
        holder = self.daemon.scheduler.holder(lease)
        if holder is not None and holder[1] == self.process:
            self.daemon.scheduler.drop(self.daemon.scheduler.lease(lease))
        self._acknowledge(lease)
        return {"ok": True}

    def _on_evicted(self, rid: int, lease: int) -> dict:
        self._acknowledge(lease)
        return {"ok": True}

    def _on_ping(self, rid: int) -> dict:
        return {"ok": True}

    def _on_status(self, rid: int) -> dict:
        return {"ok": True, "status": self.daemon.status()}

    def _on_reset_quota(self, rid: int, user: str | None) -> dict:
        # Only the daemon's own user gets a connection at all (see Daemon._admit): the owner of the ledger.
        reset = self.daemon.scheduler.ledger.reset(user)
        log.info("%s reset today's quota of %s (%d accounts)", self, repr(user) if user else "every account", reset)
        return {"ok": True, "reset": reset}

    def _lease(self, lease_id: int) -> Lease:
        """A lease this client's process holds; one a previous daemon granted becomes this connection's."""
        scheduler = self.daemon.scheduler
        holder = scheduler.holder(lease_id)
        if holder is None or holder[1] != self.process:
            raise SchedulerError(f"lease {lease_id} is not held by this client: was it released twice?")
        if holder[0] == orphan(self.process):
            scheduler.transfer(holder[0], self, only={lease_id})
        return scheduler.lease(lease_id)

    # -- evicting idle workers --------------------------------------------------------------

    def evict(self, lease_id: int) -> None:
        """Ask the client to kill the idle worker on `lease_id`; wait until it did (or is gone)."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return
            self._evictions[lease_id] = done
        if self.send({"op": "evict", "lease": lease_id}):
            if not done.wait(EVICT_TIMEOUT):
                log.warning("%s did not evict lease %s within %g s: taking it back", self, lease_id,
                            EVICT_TIMEOUT)
        with self._lock:
            self._evictions.pop(lease_id, None)

    def _acknowledge(self, lease_id: int) -> None:
        with self._lock:
            done = self._evictions.pop(lease_id, None)
        if done is not None:
            done.set()

    # -- writing and closing ----------------------------------------------------------------

    def send(self, message: dict) -> bool:
        """Queue one frame for the writer; False (and the connection closed) if it cannot go."""
        frame = encode(message)
        if self._closed:
            return False
        try:
            self._outbox.put_nowait(frame)
            return True
        except queue.Full:
            log.warning("%s stopped reading (%d replies waiting): dropping it", self, OUTBOX)
        self.close()
        return False

    def _write(self) -> None:
        while True:
            frame = self._outbox.get()
            if frame is None:
                return
            try:
                # Bounded by the socket's timeout (the heartbeat timeout): a client that
                # reads nothing for that long is as good as gone.
                self.sock.sendall(frame)
            except OSError:
                self.close()
                return

    def close(self, *, drain: bool = False) -> None:
        """Close the connection; `drain`: let the writer send what is queued first (a moment at most)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            evictions = list(self._evictions.values())
            self._evictions.clear()
        for done in evictions:
            done.set()
        if drain and self._writer.is_alive() and self._writer is not threading.current_thread():
            try:
                self._outbox.put(None, timeout=DRAIN_TIMEOUT)
                self._writer.join(DRAIN_TIMEOUT)
            except queue.Full:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._outbox.put_nowait(None)  # the writer stops (a full outbox fails on the shut socket)
        except queue.Full:
            pass


class Daemon:
    """The scheduler of a machine, served on a unix socket. start(), then stop()."""

    def __init__(
        self,
        socket_path: str | os.PathLike,
        *,
        policy: Policy | None = None,
        devices: list[Device] | None = None,
        ledger_path: str | os.PathLike | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        reclaim_grace: float = RECLAIM_GRACE,
        node: str | None = None,
        node_timeout: float = NODE_TIMEOUT,
    ) -> None:
        """`ledger_path`: the SQLite file, or a postgresql:// URL (default: ZEROGPU_LEDGER, else the file
        under ZEROGPU_DATA_DIR); `node`: this node's name in the fleet (default: the host name)."""
        self.socket_path = os.path.abspath(os.fspath(socket_path))
        self.heartbeat_timeout = heartbeat_timeout
        self.reclaim_grace = reclaim_grace
        ledger = open_ledger(ledger_path, policy, holder=f"daemon:{self.socket_path}", node=node,
                             lease_timeout=node_timeout)
        try:
            self.scheduler = EmbeddedScheduler(devices if devices is not None else discover(), ledger=ledger)
        except BaseException:
            ledger.close()
            raise
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.started = time.time()

    def start(self) -> None:
        """Bind the socket (refused if a daemon serves it), take over the previous run's leases, serve."""
        self._listener = bind(self.socket_path)
        ledger = self.scheduler.ledger
        try:
            ledger.register([device_to_wire(d) for d in self.scheduler.devices], self.scheduler.policy.large_per_gpu,
                            socket_path=self.socket_path)
        except BaseException:
            self._listener.close()
            os.unlink(self.socket_path)
            raise
        mine = [row for row in ledger.reservations(ledger.holder) if row.node in (ledger.node, "")]
        adopted = self.scheduler.adopt(mine, orphan)
        if adopted:
            log.info("took over %d leases of live clients from the previous daemon", adopted)
        for target, name in ((self._accept, "zerogpu-accept"), (self._tend, "zerogpu-tend")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving; leases of clients still running stay in the ledger for the next daemon."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        for connection in connections:
            connection.thread.join(5)
        for thread in self._threads:
            thread.join(5)
        self.scheduler.close(settle=False)

    def forget(self, connection: Connection) -> None:
        """A connection ended: unless the daemon is stopping, what it held comes back."""
        with self._lock:
            self._connections.discard(connection)
        if not self._stopping.is_set():
            returned = self.scheduler.abandon(connection)
            if returned:
                log.info("%s went away: %d leases returned", connection, returned)

    def status(self) -> dict:
        with self._lock:
            clients = sorted(c.process.pid for c in self._connections)
        return {
            **self.scheduler.status(),
            "daemon": {"pid": os.getpid(), "socket": self.socket_path, "clients": clients, "started": self.started,
                       "node": self.scheduler.ledger.node, "ledger": self.scheduler.ledger.where},
        }

    def reclaim(self) -> int:
        """Take back the running leases past their duration + reclaim_grace; return how many.

        Clients enforce durations themselves; this is for one that does not (or
        cannot), so that the scheduler's picture of when capacity comes back
        holds. The client is told to kill the lease's worker; the lease is
        charged its full duration.
        """
        late = self.scheduler.overdue(self.reclaim_grace)
        for held in late:
            log.warning("lease %s of %s ran %g s past its duration: taking it back", held.lease.id, held.owner,
                        self.reclaim_grace)
            try:
                self.scheduler.release(held.lease, used=held.lease.request.duration, charge=True)
            except SchedulerError:
                continue  # released meanwhile: nothing to tell
            # Told once the lease is back, so a client that hears it finds the capacity free.
            if isinstance(held.owner, Connection):
                held.owner.send({"op": "expired", "lease": held.lease.id})
        return len(late)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(TICK)  # e.g. out of file descriptors: do not spin
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        pid, uid = peer(sock)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (pid %d): only uid %d may use this daemon",
                        uid, pid, os.getuid())
            sock.close()
            return
        try:
            process = Owner.of(pid)
        except SchedulerError:
            sock.close()
            return
        connection = Connection(self, sock, process)
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._connections.add(connection)
        connection.thread.start()

    def _tend(self) -> None:
        """Queue timeouts, and leases of processes that died while no daemon watched them."""
        last_sweep = 0.0
        while not self._stopping.wait(TICK):
            try:
                self.scheduler.expire()
                self.reclaim()
                if time.monotonic() - last_sweep >= SWEEP_EVERY:
                    last_sweep = time.monotonic()
                    for owner in self.scheduler.owners():
                        if isinstance(owner, tuple) and not owner[1].alive():
                            self.scheduler.abandon(owner)
                    self.scheduler.ledger.sweep()
            except Exception:
                log.exception("the daemon's housekeeping failed")


def bind(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600; a stale socket file is replaced."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SchedulerError(f"{path} exists and is not a socket: choose another path for the daemon")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise SchedulerError(f"a node daemon already serves {path}: stop it first or choose another path")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a daemon that died
        finally:
            probe.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that leaves the socket to its owner alone from the start.
    previous = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as error:
        listener.close()
        raise SchedulerError(f"cannot create the daemon's socket {path}: {error}") from error
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(128)
    return listener


def lease_to_wire(lease: Lease) -> dict:
    return {"id": lease.id, "device": lease.device.index, "slot": lease.slot,
            "memory_fraction": lease.memory_fraction, "warm": lease.warm}


def serve(
    socket_path: str | os.PathLike | None = None,
    *,
    policy: Policy | None = None,
    ledger_path: str | os.PathLike | None = None,
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    node: str | None = None,
    node_timeout: float = NODE_TIMEOUT,
    ready: Callable[[Daemon], None] | None = None,
) -> None:
    """Run the node daemon until SIGTERM or SIGINT (`zerogpu serve`).

    `socket_path` defaults to ZEROGPU_SCHEDULER; `ready(daemon)` is called
    once it accepts connections.
    """
    path = socket_path or settings.scheduler_socket()
    if not path:
        raise InvalidArgument("name the daemon's socket: pass a path or set ZEROGPU_SCHEDULER")
    daemon = Daemon(path, policy=policy, ledger_path=ledger_path, heartbeat_timeout=heartbeat_timeout, node=node,
                    node_timeout=node_timeout)
    stop = threading.Event()
    received: list[int] = []
    handlers = {}

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handlers[signum] = signal.signal(signum, on_signal)
    started = False
    try:
        daemon.start()
        started = True
        log.info("serving %d GPUs on %s", len(daemon.scheduler.devices), daemon.socket_path)
        if ready is not None:
            ready(daemon)
        while not stop.wait(0.5):
            pass
    finally:
        daemon.stop()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if started:
            why = f"on {signal.Signals(received[0]).name}" if received else "on an error"
            log.info("stopped %s: no longer serving %s; the leases of apps still running stay in the "
                     "ledger for the next daemon", why, daemon.socket_path)
