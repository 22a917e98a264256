"""The scheduler: lease throughput, embedded and through the node daemon, and a simulated day.

    python benchmarks/bench_scheduler.py [--pairs N] [--repeat N] [--calls N] [--rate R] [--seed S] [--json PATH]

Throughput: lease acquire + release pairs per second on free GPUs, each pair
admitted against its quota and charged in the SQLite ledger (one transaction
each way), from one thread, from 4 threads, and through a node daemon from 1
and from 4 client processes; the median of --repeat runs, with the range.
Targets: 5,000/s embedded, 1,000/s daemon.

Simulated workload: `--calls` calls of mixed tiers, sizes and durations over 4
emulated GPUs, arriving faster than the GPUs can serve them, driven through
the embedded scheduler on a simulated clock (each call runs for a random part
of the duration it asked for). Reported: utilization of the GPU slices while
calls are waiting (target 95%), the wait per tier (p50, p99), quota refusals,
and an order check: every time a call is served while one ranked before it by
the policy still waits, the overtaking must be one the policy allows (a large
call backfilling a GPU kept for an xlarge one, or a shorter large call ending
before a reserved GPU drains). Any other is counted as a violation.

Fleet (`--fleet-only`, or after the rest): `--fleet-nodes` nodes of
`--gpus-per-node` GPUs, each node an embedded scheduler of its own, sharing
one quota ledger; `--visitors` visitors of mixed tiers spend about their
daily quota in sessions over a simulated day, `--peak-share` of them in an
evening peak hour; a load balancer sends each call to the node with the most
free slices. Reported: utilization over the day and while calls wait
(target 95%), and the wait per tier.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from zerogpu.schedule.client import DaemonClient
from zerogpu.cuda.devices import emulated_devices
from zerogpu.errors import QuotaExceeded
from zerogpu.identity import TIERS, Identity
from zerogpu.schedule.policy import DAILY_QUOTA, SIZE_WEIGHT, Policy
from zerogpu.schedule.quota_sqlite import SQLiteLedger
from zerogpu.schedule.leases import LeaseRequest, Waiter
from zerogpu.schedule.scheduler import EmbeddedScheduler

from report import command_line, console, machine, median, race, write_figures

GPUS = 4
ROOMY = Policy(daily_quota={tier: 1e12 for tier in TIERS})
REQUEST = LeaseRequest(Identity("bench", "pro"), 30.0)


# -- throughput ------------------------------------------------------------------------------


def embedded_rate(folder: Path, pairs: int, threads: int) -> float:
    """Acquire + release pairs per second of one EmbeddedScheduler, from `threads` threads."""
    ledger = SQLiteLedger(folder / f"embedded-{threads}.sqlite3", ROOMY)
    scheduler = EmbeddedScheduler(emulated_devices(GPUS), ledger=ledger)
    try:
        for _ in range(200):  # warm up: statement cache, pages
            scheduler.release(scheduler.acquire(REQUEST, timeout=5), used=0.001)
        each = pairs // threads
        start = threading.Barrier(threads + 1)

        def loop() -> None:
            start.wait()
            for _ in range(each):
                scheduler.release(scheduler.acquire(REQUEST, timeout=5), used=0.001)

        workers = [threading.Thread(target=loop) for _ in range(threads)]
        for worker in workers:
            worker.start()
        start.wait()
        began = time.perf_counter()
        for worker in workers:
            worker.join()
        return each * threads / (time.perf_counter() - began)
    finally:
        scheduler.close()


CLIENT_LOOP = textwrap.dedent("""
    import sys, time
    from zerogpu.schedule.client import DaemonClient
    from zerogpu.identity import Identity
    from zerogpu.schedule.leases import LeaseRequest
    client = DaemonClient(sys.argv[1])
    request = LeaseRequest(Identity("bench", "pro"), 30.0)
    for _ in range(200):
        client.release(client.acquire(request, timeout=5), used=0.001)
    client.status()
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.perf_counter()
    for _ in range(int(sys.argv[2])):
        client.release(client.acquire(request, timeout=5), used=0.001)
    client.status()  # every release is done
    print(time.perf_counter() - began, flush=True)
    client.close()
""")


class DaemonProcess:
    def __init__(self, folder: Path) -> None:
        self.socket = str(folder / "bench.sock")
        env = {**os.environ, "ZEROGPU_BACKEND": "emulated", "ZEROGPU_EMULATED_GPUS": str(GPUS)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zerogpu.cli", "serve", "--socket", self.socket, "--ledger",
             str(folder / "daemon.sqlite3")] + [f"--quota={tier}=1e12" for tier in TIERS],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        if not self.proc.stdout.readline().startswith("ready"):
            raise RuntimeError("the node daemon did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.proc.stdout.close()


def daemon_rate(daemon: DaemonProcess, pairs: int, clients: int) -> float:
    """Pairs per second through the daemon from `clients` processes, one thread each."""
    if clients == 1:
        client = DaemonClient(daemon.socket)
        try:
            for _ in range(200):
                client.release(client.acquire(REQUEST, timeout=5), used=0.001)
            began = time.perf_counter()
            for _ in range(pairs):
                client.release(client.acquire(REQUEST, timeout=5), used=0.001)
            client.status()
            return pairs / (time.perf_counter() - began)
        finally:
            client.close()
    each = pairs // clients
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT_LOOP, daemon.socket, str(each)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    return each * clients / race(procs, timeout=30)


# -- the simulated workload -------------------------------------------------------------------

TIER_MIX = {"anonymous": 0.3, "free": 0.5, "pro": 0.2}
USERS = {"anonymous": 300, "free": 200, "pro": 50}
DURATIONS = (5, 10, 20, 30, 60, 90, 120)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Call:
    index: int
    arrival: float
    request: LeaseRequest
    runs_for: float
    waiter: Waiter | None = None
    granted: float | None = None
    refused: bool = False     # QuotaExceeded
    timed_out: bool = False   # NoGPUAvailable


@dataclass
class Simulation:
    calls: list[Call]
    busy_while_waiting: float = 0.0      # slice-seconds busy while a call waited
    capacity_while_waiting: float = 0.0  # slice-seconds that existed meanwhile
    violations: list[str] = field(default_factory=list)
    overtakes: int = 0


def workload(count: int, seed: int, rate: float) -> list[Call]:
    rng = random.Random(seed)
    calls, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(rate)
        tier = rng.choices(list(TIER_MIX), weights=list(TIER_MIX.values()))[0]
        user = f"{tier}-{rng.randrange(USERS[tier])}"
        size = "xlarge" if rng.random() < 0.25 else "large"
        # Only durations the tier may ask for at this size (an xlarge second costs two).
        legal = [d for d in DURATIONS if d * SIZE_WEIGHT[size] <= DAILY_QUOTA[tier]]
        duration = float(rng.choice(legal))
        calls.append(Call(index, now, LeaseRequest(Identity(user, tier), duration, size),
                          runs_for=duration * rng.uniform(0.3, 1.0)))
    return calls


def simulate(calls: list[Call], folder: Path, policy: Policy, timeout: float) -> Simulation:
    """Drive the calls through an EmbeddedScheduler on a simulated clock."""
    clock = Clock()
    ledger = SQLiteLedger(folder / "simulation.sqlite3", policy)
    scheduler = EmbeddedScheduler(emulated_devices(GPUS), ledger=ledger, clock=clock)
    result = Simulation(calls)
    by_seq: dict[int, Call] = {}
    waiting: dict[int, Call] = {}
    ends: list[tuple[float, int, object]] = []
    occupied: dict[int, list[int]] = {d: [] for d in range(GPUS)}  # device -> slices taken (by lease)
    busy = 0
    granted_now: list[Call] = []

    def start(call: Call) -> None:
        nonlocal busy
        lease = call.waiter.lease
        call.granted = clock.now
        waiting.pop(call.waiter.seq, None)
        busy += slices(call)
        occupied[lease.device.index].append(lease.id)
        heapq.heappush(ends, (clock.now + call.runs_for, call.index, lease))
        granted_now.append(call)

    def slices(call: Call) -> int:
        return policy.large_per_gpu if call.request.size == "xlarge" else 1

    def served(waiter: Waiter) -> None:
        if waiter.lease is not None:
            start(by_seq[waiter.seq])
        else:
            waiting.pop(waiter.seq).timed_out = True

    def event(action) -> None:
        """Run one arrival, end or queue timeout; check the order of what it served."""
        before = {d: list(ids) for d, ids in occupied.items()}
        granted_now.clear()
        action()
        check_order(result, scheduler.policy, clock.now, list(granted_now), list(waiting.values()), before)

    arrivals = iter(calls)
    upcoming = next(arrivals, None)
    last = 0.0
    never = float("inf")
    while upcoming is not None or ends or waiting:
        next_end = ends[0][0] if ends else never
        next_expiry = min(call.waiter.deadline for call in waiting.values()) if waiting else never
        moment = min(upcoming.arrival if upcoming is not None else never, next_end, next_expiry)
        if waiting:
            result.busy_while_waiting += busy * (moment - last)
            result.capacity_while_waiting += GPUS * policy.large_per_gpu * (moment - last)
        clock.now = last = moment
        if next_end <= moment:
            _, index, lease = heapq.heappop(ends)
            call = calls[index]
            busy -= slices(call)
            occupied[lease.device.index].remove(lease.id)
            event(lambda lease=lease, call=call: scheduler.release(lease, used=call.runs_for))
            continue
        if next_expiry <= moment:
            event(scheduler.expire)
            continue
        call, upcoming = upcoming, next(arrivals, None)

        def arrive(call=call) -> None:
            try:
                waiter = scheduler.submit(call.request, timeout=timeout, on_done=served)
            except QuotaExceeded:
                call.refused = True
                return
            call.waiter = waiter
            by_seq[waiter.seq] = call
            if waiter.lease is not None:
                start(call)
            else:
                waiting[waiter.seq] = call

        event(arrive)
    scheduler.close()
    return result


def check_order(result: Simulation, policy: Policy, now: float, granted: list[Call], still: list[Call],
                before: dict[int, list[int]]) -> None:
    """Count the calls served ahead of a better-ranked waiting call that the policy does not allow."""
    def rank(call: Call) -> tuple:
        w = call.waiter
        return (*policy.priority(call.request.identity.tier, w.left, call.request.duration, w.arrival, now), w.seq)

    def whole_for(waits: Call, device: int) -> bool:
        """Whether `device` was free and no call ranked before `waits` took part of it."""
        return not before[device] and not any(
            g.waiter.lease.device.index == device and rank(g) < rank(waits) for g in granted)

    for got in granted:
        for waits in still:
            if rank(waits) >= rank(got):
                continue
            result.overtakes += 1
            device = got.waiter.lease.device.index
            if got.request.size == "xlarge":
                why = "an xlarge call took a whole GPU"
            elif waits.request.size == "large" and waits.request.duration <= got.request.duration:
                why = "a large call no shorter than the waiting one took a slice"
            elif waits.request.size == "xlarge" and whole_for(waits, device):
                why = "a large call took a slice of a GPU that was whole and free"
            else:
                continue  # a backfill the policy allows
            result.violations.append(f"t={now:.1f}: call {got.index} before call {waits.index}: {why}")


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def summarize(sim: Simulation, policy: Policy, rate: float, seconds: float) -> dict:
    """The figures of one simulation, as plain data."""
    served = [c for c in sim.calls if c.granted is not None]
    slices = GPUS * policy.large_per_gpu
    demand = sum(c.runs_for * (policy.large_per_gpu if c.request.size == "xlarge" else 1) for c in sim.calls)
    tiers = {}
    for tier in reversed(TIERS):
        of_tier = [c for c in sim.calls if c.request.identity.tier == tier]
        waits = [c.granted - c.arrival for c in of_tier if c.granted is not None]
        tiers[tier] = {
            "calls": len(of_tier), "served": len(waits), "refused_quota": sum(c.refused for c in of_tier),
            "timed_out": sum(c.timed_out for c in of_tier),
            "wait_p50_s": percentile(waits, 0.5), "wait_p99_s": percentile(waits, 0.99),
        }
    return {
        "arrival_rate_per_s": rate,
        "offered_load": demand / (slices * sim.calls[-1].arrival),
        "simulated_s": max(c.granted + c.runs_for for c in served) if served else 0.0,
        "wall_s": seconds,
        "utilization_while_waiting": (sim.busy_while_waiting / sim.capacity_while_waiting
                                      if sim.capacity_while_waiting else 1.0),
        "tiers": tiers,
        "overtakes": sim.overtakes,
        "violations": sim.violations,
    }


def simulation_table(summary: dict, timeout: float) -> Table:
    table = Table(title=f"simulated: {summary['arrival_rate_per_s']:g} arrivals/s, {GPUS} GPUs x 2 slices, "
                        f"queue timeout {timeout:g} s, {summary['simulated_s'] / 3600:.2f} h in "
                        f"{summary['wall_s']:.1f} s")
    # The waits are those of the calls served; a call that timed out waited the queue timeout.
    for column in ("tier", "calls", "served", "no quota", "timed out", "served: wait p50 s", "wait p99 s"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, row in summary["tiers"].items():
        if not row["calls"]:
            continue
        table.add_row(tier, str(row["calls"]), str(row["served"]), str(row["refused_quota"]), str(row["timed_out"]),
                      f"{row['wait_p50_s']:.1f}", f"{row['wait_p99_s']:.1f}")
    return table


# -- the fleet: nodes behind a load balancer, one shared ledger, a simulated day -----------------

FLEET_TIERS = {"anonymous": 0.3, "free": 0.5, "pro": 0.2}


@dataclass
class FleetCall:
    arrival: float
    request: LeaseRequest
    runs_for: float
    node: int = -1
    granted: float | None = None
    refused: bool = False
    timed_out: bool = False


def fleet_workload(visitors: int, seed: int, peak_share: float) -> list[FleetCall]:
    """A day of calls: each visitor spends about its daily quota in sessions; `peak_share` of the
    sessions start in a one-hour peak at 20:00 UTC, the others over the day."""
    rng = random.Random(seed)
    calls = []
    for n in range(visitors):
        tier = rng.choices(list(FLEET_TIERS), weights=list(FLEET_TIERS.values()))[0]
        identity = Identity(f"{tier}-{n}", tier)
        budget = DAILY_QUOTA[tier] * rng.uniform(0.5, 1.3)  # some run out and are refused
        now = 20 * 3600 + rng.uniform(0, 3600) if rng.random() < peak_share else rng.uniform(0, 86400 - 3600)
        while budget > 0:
            size = "xlarge" if rng.random() < 0.25 else "large"
            legal = [d for d in DURATIONS if d * SIZE_WEIGHT[size] <= DAILY_QUOTA[tier]]
            duration = float(rng.choice(legal))
            runs_for = duration * rng.uniform(0.3, 1.0)
            calls.append(FleetCall(now, LeaseRequest(identity, duration, size), runs_for))
            budget -= runs_for * SIZE_WEIGHT[size]
            now += rng.expovariate(1 / 20.0)  # the visitor's next call, about 20 s later
    calls.sort(key=lambda call: call.arrival)
    return calls


def simulate_fleet(calls: list[FleetCall], folder: Path, nodes: int, gpus: int, timeout: float) -> dict:
    """Every node an EmbeddedScheduler of its own, all on one ledger; a load balancer sends each call
    to the node with the most free slices (one with a whole free GPU for an xlarge call)."""
    policy = Policy()
    clock = Clock()
    ledger = SQLiteLedger(folder / "fleet.sqlite3", policy, clock=clock, lease_timeout=1e9)
    schedulers = [EmbeddedScheduler(emulated_devices(gpus), ledger=ledger, clock=clock) for _ in range(nodes)]
    per_gpu = policy.large_per_gpu
    free = [[per_gpu] * gpus for _ in range(nodes)]  # free slices per GPU, as the balancer sees them
    waiting: list[dict[int, FleetCall]] = [{} for _ in range(nodes)]
    ends: list[tuple[float, int, int, object]] = []
    order = 0
    busy = 0
    stats = {"busy_while_waiting": 0.0, "capacity_while_waiting": 0.0}
    capacity = nodes * gpus * per_gpu

    def slices(call: FleetCall) -> int:
        return per_gpu if call.request.size == "xlarge" else 1

    def start(call: FleetCall, lease) -> None:
        nonlocal busy, order
        call.granted = clock.now
        busy += slices(call)
        free[call.node][lease.device.index] -= slices(call)
        order += 1
        heapq.heappush(ends, (clock.now + call.runs_for, order, id(call), (call, lease)))

    def served_on(node: int):
        def served(waiter: Waiter) -> None:
            call = waiting[node].pop(waiter.seq)
            if waiter.lease is not None:
                start(call, waiter.lease)
            else:
                call.timed_out = True
        return served

    def pick(call: FleetCall) -> int:
        if call.request.size == "xlarge":
            whole = [n for n in range(nodes) if per_gpu in free[n] and not waiting[n]]
            if whole:
                return max(whole, key=lambda n: sum(free[n]))
        return max(range(nodes), key=lambda n: sum(free[n]) - len(waiting[n]) * per_gpu)

    never = float("inf")
    arrivals = iter(calls)
    upcoming = next(arrivals, None)
    last = 0.0
    while upcoming is not None or ends or any(waiting):
        queued = any(waiting)
        next_end = ends[0][0] if ends else never
        next_expiry = min(w.deadline for n in range(nodes) for w in schedulers[n]._waiters.values()) \
            if queued else never
        moment = min(upcoming.arrival if upcoming is not None else never, next_end, next_expiry)
        if queued:
            stats["busy_while_waiting"] += busy * (moment - last)
            stats["capacity_while_waiting"] += capacity * (moment - last)
        clock.now = last = moment
        if next_end <= moment:
            _, _, _, (call, lease) = heapq.heappop(ends)
            busy -= slices(call)
            free[call.node][lease.device.index] += slices(call)
            schedulers[call.node].release(lease, used=call.runs_for)
            continue
        if next_expiry <= moment:
            for scheduler in schedulers:
                scheduler.expire()
            continue
        call, upcoming = upcoming, next(arrivals, None)
        call.node = pick(call)
        try:
            waiter = schedulers[call.node].submit(call.request, timeout=timeout, on_done=served_on(call.node))
        except QuotaExceeded:
            call.refused = True
            continue
        if waiter.lease is not None:
            start(call, waiter.lease)
        else:
            waiting[call.node][waiter.seq] = call
    for scheduler in schedulers[1:]:
        scheduler.close(settle=False)  # the shared ledger closes with the first one
    schedulers[0].close()
    tiers = {}
    for tier in reversed(TIERS):
        of_tier = [c for c in calls if c.request.identity.tier == tier]
        waits = [c.granted - c.arrival for c in of_tier if c.granted is not None]
        tiers[tier] = {"calls": len(of_tier), "served": len(waits), "refused_quota": sum(c.refused for c in of_tier),
                       "timed_out": sum(c.timed_out for c in of_tier),
                       "wait_p50_s": percentile(waits, 0.5), "wait_p99_s": percentile(waits, 0.99)}
    demand = sum(c.runs_for * slices(c) for c in calls if c.granted is not None)
    return {
        "nodes": nodes, "gpus_per_node": gpus, "calls": len(calls),
        "visitors": len({c.request.identity for c in calls}),
        "utilization_day": demand / (capacity * 86400),
        "seconds_with_calls_waiting": stats["capacity_while_waiting"] / capacity,
        "utilization_while_waiting": (stats["busy_while_waiting"] / stats["capacity_while_waiting"]
                                      if stats["capacity_while_waiting"] else None),
        "tiers": tiers,
    }


def fleet_table(summary: dict, wall: float) -> Table:
    table = Table(title=f"fleet: {summary['nodes']} nodes x {summary['gpus_per_node']} GPUs, {summary['visitors']:,} "
                        f"visitors, {summary['calls']:,} calls over a simulated day, in {wall:.0f} s")
    # The waits are those of the calls served; a call that timed out waited the queue timeout.
    for column in ("tier", "calls", "served", "no quota", "timed out", "served: wait p50 s", "wait p99 s"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, row in summary["tiers"].items():
        if not row["calls"]:
            continue
        table.add_row(tier, f"{row['calls']:,}", f"{row['served']:,}", f"{row['refused_quota']:,}",
                      f"{row['timed_out']:,}", f"{row['wait_p50_s']:.1f}", f"{row['wait_p99_s']:.1f}")
    return table


def fleet_main(args, console) -> dict:
    runs = []
    for nodes in (int(text) for text in args.fleet_nodes.split(",")):
        calls = fleet_workload(args.visitors, args.seed, args.peak_share)
        console.print(f"simulating a day of {len(calls):,} calls from {args.visitors:,} visitors on {nodes} nodes ...")
        with tempfile.TemporaryDirectory(prefix="zg-fleet-", dir="/tmp") as tmp:
            began = time.perf_counter()
            summary = simulate_fleet(calls, Path(tmp), nodes, args.gpus_per_node, args.timeout)
            summary["wall_s"] = time.perf_counter() - began
        console.print(fleet_table(summary, summary["wall_s"]))
        during = summary["utilization_while_waiting"]
        console.print(f"utilization over the day {summary['utilization_day']:.1%}; calls waited during "
                      f"{summary['seconds_with_calls_waiting'] / 3600:.2f} h, with the fleet "
                      + (f"{during:.1%} busy meanwhile (target 95%)" if during is not None else "never full"))
        runs.append(summary)
    return {"visitors": args.visitors, "peak_share": args.peak_share, "seed": args.seed, "runs": runs}


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000, help="acquire+release pairs per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per path (the median is kept)")
    parser.add_argument("--calls", type=int, default=1000, help="calls in the simulated workload")
    parser.add_argument("--rates", default="0.25,0.35",
                        help="simulated arrivals per second, one simulation each "
                             "(0.25 and 0.35: about 1.05 and 1.45 x what the GPUs can serve)")
    parser.add_argument("--timeout", type=float, default=60.0, help="queue timeout of the simulated calls")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench_scheduler.json"), help="where to write the figures")
    parser.add_argument("--fleet-only", action="store_true", help="run only the fleet simulation")
    parser.add_argument("--fleet-nodes", default="100", help="fleet sizes to simulate, in nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--visitors", type=int, default=10000)
    parser.add_argument("--peak-share", type=float, default=0.5, help="share of the sessions in the evening peak")
    args = parser.parse_args(argv)
    out = console()
    if args.fleet_only:
        report = {"benchmark": "bench_scheduler (fleet)", "command": command_line(argv), "machine": machine(),
                  "fleet": fleet_main(args, out)}
        write_figures(args.json, report, out)
        return 0

    with tempfile.TemporaryDirectory(prefix="zg-bench-", dir="/tmp") as tmp:
        folder = Path(tmp)
        out.print("measuring lease throughput ...")
        runs: dict[str, list[float]] = {name: [] for name in (
            "embedded, 1 thread", "embedded, 4 threads", "daemon, 1 client process", "daemon, 4 client processes")}
        daemon = DaemonProcess(folder)
        try:
            for _ in range(args.repeat):
                runs["embedded, 1 thread"].append(embedded_rate(folder, args.pairs, 1))
                runs["embedded, 4 threads"].append(embedded_rate(folder, args.pairs, 4))
                runs["daemon, 1 client process"].append(daemon_rate(daemon, args.pairs // 4, 1))
                runs["daemon, 4 client processes"].append(daemon_rate(daemon, args.pairs // 4, 4))
        finally:
            daemon.stop()
        rates = {name: median(values) for name, values in runs.items()}
        simulations = []
        for rate in (float(text) for text in args.rates.split(",")):
            out.print(f"simulating {args.calls} calls over {GPUS} emulated GPUs, {rate:g} arrivals/s ...")
            calls = workload(args.calls, args.seed, rate)
            began = time.perf_counter()
            sim = simulate(calls, folder / f"sim-{rate:g}", Policy(), args.timeout)
            simulations.append(summarize(sim, Policy(), rate, time.perf_counter() - began))

    targets = {"embedded": 5000, "daemon": 1000}
    table = Table(title=f"lease acquire + release (free GPUs, charged in SQLite; median of {args.repeat})")
    for column in ("path", "pairs/s", "range", "target"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, rate in rates.items():
        target = targets[name.split(",")[0]]
        table.add_row(name, f"{rate:,.0f}", f"{min(runs[name]):,.0f} - {max(runs[name]):,.0f}",
                      f"{target:,}" + (" ok" if rate >= target else " MISSED"))
    out.print(table)

    for summary in simulations:
        out.print(simulation_table(summary, args.timeout))
        out.print(f"offered load: {summary['offered_load']:.2f} x the GPUs' capacity; utilization while calls "
                      f"were waiting: {summary['utilization_while_waiting']:.1%} (target 95%)")
        out.print(f"order check: {summary['overtakes']} overtakes of a better-ranked waiting call, "
                      f"{len(summary['violations'])} not allowed by the policy")
        for line in summary["violations"][:10]:
            out.print(f"  {line}")

    report = {
        "benchmark": "bench_scheduler",
        "command": command_line(argv),
        "machine": machine(),
        "throughput_pairs_per_s": rates,
        "throughput_runs": runs,
        "simulation": {"calls": args.calls, "gpus": GPUS, "seed": args.seed, "queue_timeout_s": args.timeout,
                       "runs": simulations},
    }
    write_figures(args.json, report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
