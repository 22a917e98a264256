"""`zerogpu status`: the GPUs, the leases, the queue and each identity's quota left.

With a node daemon (a socket given, or ZEROGPU_SCHEDULER), the daemon says.
Without one, the machine's quota ledger does: it lists today's quotas and the
calls embedded schedulers are running now (their queues live in their apps).
`zerogpu status --fleet` reads the ledger every node shares: each node, its
GPUs and leases, the calls admitted and waiting, and each identity's quota.
"""

from __future__ import annotations

import os
import time

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .. import settings
from ..cuda.devices import discover
from .policy import Policy
from .protocol import device_to_wire
from .ledger import open_ledger
from .quota import QuotaLedger, next_reset, spell_seconds
from ..units import describe_size


def status(socket_path: str | os.PathLike | None = None) -> dict:
    """What the scheduler of this machine is doing, as plain data (see render_status)."""
    path = socket_path or settings.scheduler_socket()
    if path:
        from .client import DaemonClient

        client = DaemonClient(path)
        try:
            state = client.status()
        finally:
            client.close()
        # The daemon counts the connection that asked: it is not an app.
        clients = state["daemon"]["clients"]
        if os.getpid() in clients:
            clients.remove(os.getpid())
        return {"source": "daemon", **state}
    return embedded_status()


def embedded_status(ledger: QuotaLedger | None = None) -> dict:
    """The machine seen from its quota ledger, when no daemon runs."""
    owned = ledger is None
    ledger = ledger or open_ledger(policy=Policy())
    try:
        devices = discover()
        rows = ledger.reservations()
        balances = ledger.balances()
    finally:
        if owned:
            ledger.close()
    now = time.time()
    slots: dict[int, list[int | None]] = {d.index: [None] * ledger.policy.large_per_gpu for d in devices}
    rows = [row for row in rows if row.node in (ledger.node, "")]
    for row in rows:
        if row.device in slots and row.holder == "embedded":
            cells = range(ledger.policy.large_per_gpu) if row.size == "xlarge" else [row.slot]
            for cell in cells:
                if cell is not None and 0 <= cell < len(slots[row.device]):
                    slots[row.device][cell] = row.id
    return {
        "source": "ledger",
        "devices": [{**device_to_wire(d), "slots": slots[d.index]} for d in devices],
        "leases": [
            {"id": row.id, "user": row.identity.user, "tier": row.identity.tier, "size": row.size,
             "device": row.device, "slot": row.slot, "duration": row.duration, "held": now - row.started,
             "state": "running" if row.device is not None else "waiting", "key": None, "pid": row.owner.pid}
            for row in rows
        ],
        "queue": [],
        "quota": [b.describe() for b in balances],
        "resets_at": next_reset(now),
        "policy": ledger.policy.describe(),
    }


def fleet_status(ledger: QuotaLedger | str | None = None) -> dict:
    """Every live node of the ledger's fleet (`ledger`: a ledger, its URL or path; None: ZEROGPU_LEDGER)."""
    owned = not isinstance(ledger, QuotaLedger)
    opened = open_ledger(ledger, Policy()) if owned else ledger
    try:
        nodes = opened.nodes()
        rows = opened.reservations()
        balances = opened.balances()
    finally:
        if owned:
            opened.close()
    now = time.time()
    entries = []
    for node in nodes:
        mine = [row for row in rows if row.node == node.name]
        devices = []
        for device in node.devices:
            slots: list[int | None] = [None] * node.slices
            for row in mine:
                if row.device == device["index"]:
                    cells = range(node.slices) if row.size == "xlarge" else [row.slot]
                    for cell in cells:
                        if cell is not None and 0 <= cell < node.slices:
                            slots[cell] = row.id
            devices.append({**device, "slots": slots})
        entries.append({
            "name": node.name, "socket": node.socket, "pid": node.pid, "heartbeat_age": max(now - node.heartbeat, 0.0),
            "timeout": node.timeout, "devices": devices,
            "leases": [lease_entry(row, now) for row in mine if row.device is not None],
            "waiting": [lease_entry(row, now) for row in mine if row.device is None],
        })
    return {
        "source": "fleet",
        "ledger": opened.where,
        "nodes": entries,
        "quota": [b.describe() for b in balances],
        "resets_at": next_reset(now),
    }


def lease_entry(row, now: float) -> dict:
    return {"id": row.id, "user": row.identity.user, "tier": row.identity.tier, "size": row.size,
            "device": row.device, "slot": row.slot, "duration": row.duration, "held": now - row.started,
            "pid": row.owner.pid, "holder": row.holder}


def render_fleet(state: dict) -> RenderableType:
    """A rich rendering of fleet_status(): the nodes and their GPUs, the leases, the waiting calls, the quotas."""
    gpus = sum(len(node["devices"]) for node in state["nodes"])
    parts: list[RenderableType] = [Text(f"zerogpu fleet on {state['ledger']}: {len(state['nodes'])} nodes, {gpus} GPUs")]
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "GPUs", "slices", "leases", "waiting", "heartbeat", "pid"):
        nodes.add_column(column)
    for node in state["nodes"]:
        slices = " | ".join(" ".join("free" if cell is None else short_id(cell) for cell in d["slots"])
                            for d in node["devices"])
        nodes.add_row(node["name"], str(len(node["devices"])), slices, str(len(node["leases"])),
                      str(len(node["waiting"])), f"{node['heartbeat_age']:.1f} s ago", str(node["pid"]))
    parts.append(nodes if state["nodes"] else Text("No node is alive.", style="dim"))
    leases = Table(title="Leases", title_justify="left")
    for column in ("node", "lease", "user", "tier", "size", "gpu", "held / asked", "state"):
        leases.add_column(column)
    for node in state["nodes"]:
        for state_name, entries in (("running", node["leases"]), ("waiting", node["waiting"])):
            for lease in entries:
                where = "-" if lease["device"] is None else f"{lease['device']}" + (
                    f".{lease['slot']}" if lease["slot"] is not None else "")
                leases.add_row(node["name"], short_id(lease["id"]), lease["user"], lease["tier"], lease["size"],
                               where, f"{lease['held']:.0f} s / {lease['duration']:g} s", state_name)
    parts.append(leases if leases.row_count else Text("No leases.", style="dim"))
    parts.append(quota_table(state))
    return Group(*parts)


def render_status(state: dict) -> RenderableType:
    """A rich rendering of status(): one table each for GPUs, leases, queue and quotas."""
    parts: list[RenderableType] = [headline(state)]

    gpus = Table(title="GPUs", title_justify="left", expand=False)
    for column in ("#", "name", "memory", "backend", "slices"):
        gpus.add_column(column)
    for device in state["devices"]:
        slices = " ".join("free" if cell is None else short_id(cell) for cell in device["slots"])
        gpus.add_row(str(device["index"]), device["name"], (describe_size(device["total_memory"]) if device["total_memory"] else "?"), device["backend"], slices)
    parts.append(gpus)

    leases = Table(title="Leases", title_justify="left")
    for column in ("lease", "user", "tier", "size", "gpu", "held / asked", "state", "pid"):
        leases.add_column(column)
    for lease in sorted(state["leases"], key=lambda lease: (lease["device"] is None, lease["device"] or 0)):
        where = "-" if lease["device"] is None else f"{lease['device']}" + (
            f".{lease['slot']}" if lease["slot"] is not None else "")
        leases.add_row(short_id(lease["id"]), lease["user"], lease["tier"], lease["size"], where,
                       f"{lease['held']:.0f} s / {lease['duration']:g} s", lease["state"], str(lease["pid"]))
    parts.append(leases if state["leases"] else Text("No leases.", style="dim"))

    if state["queue"]:
        queue = Table(title="Queue (next first)", title_justify="left")
        for column in ("#", "user", "tier", "size", "asked", "waited"):
            queue.add_column(column)
        for place, entry in enumerate(state["queue"], 1):
            queue.add_row(str(place), entry["user"], entry["tier"], entry["size"], f"{entry['duration']:g} s",
                          f"{entry['waited']:.1f} s")
        parts.append(queue)
    else:
        parts.append(Text("No call is waiting.", style="dim"))

    parts.append(quota_table(state))
    return Group(*parts)


def quota_table(state: dict) -> RenderableType:
    resets = spell_seconds(state["resets_at"] - time.time())
    quota = Table(title=f"Quota today (resets at 00:00 UTC, in {resets})", title_justify="left")
    for column in ("user", "tier", "used", "reserved", "left", "daily"):
        quota.add_column(column, justify="right" if column not in ("user", "tier") else "left")
    for entry in state["quota"]:
        quota.add_row(entry["user"], entry["tier"], f"{entry['used']:.1f} s", f"{entry['reserved']:.1f} s",
                      seconds_or_none(entry["left"], ".1f"), seconds_or_none(entry["limit"], "g"))
    if not state["quota"]:
        return Text("No quota used today.", style="dim")
    return Group(quota, Text("The ledger's owner gives quota back with `zerogpu quota reset [USER]`.", style="dim"))


def headline(state: dict) -> Text:
    policy = state["policy"]
    tiers = ", ".join(f"{tier} {seconds_or_none(seconds, 'g')}" for tier, seconds in policy["daily_quota"].items())
    if state["source"] == "daemon":
        daemon = state["daemon"]
        apps = len(daemon["clients"])
        where = (f"node daemon pid {daemon['pid']} on {daemon['socket']}, "
                 f"{apps} app{'' if apps == 1 else 's'} connected")
    else:
        where = "no node daemon: embedded schedulers, as the quota ledger sees them"
    return Text(f"zerogpu: {where}\n{policy['large_per_gpu']} large calls per GPU; daily quotas: {tiers}")


def seconds_or_none(seconds: float | None, spec: str) -> str:
    """A quota figure; None stands for no limit (the app's own account, by default)."""
    return "no limit" if seconds is None else f"{seconds:{spec}} s"


def short_id(lease_id: int) -> str:
    return f"{lease_id:x}"[-6:]
