"""The `zerogpu` command: bench, run, info, serve, status and quota."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import runpy
import sys
import traceback
import zipfile
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from . import bench as measure
from .snapshot import segments
from .schedule.daemon import HEARTBEAT_TIMEOUT, NODE_TIMEOUT
from .errors import InvalidArgument, SchedulerError, ZeroGPUError
from .schedule.policy import DEFAULT_AGING, Policy
from .units import describe_size

app = typer.Typer(
    name="zerogpu",
    help="Share GPUs between Python apps: functions hold a GPU only while they run.",
    no_args_is_help=True,
    add_completion=False,
    # Errors of zerogpu get one line; a script's own errors its usual traceback.
    pretty_exceptions_enable=False,
    # Plain help: typer's rich help shows flags such as --help and --json as taking a <bool> value.
    rich_markup_mode=None,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a program ended by Ctrl-C (128 + SIGINT)


def fail(command: str, message: object, code: int | None = None) -> NoReturn:
    """One line on stderr, then exit with `code` (by default 2 for a bad value or setting, else 1)."""
    typer.echo(f"zerogpu {command}: {message}", err=True)
    raise typer.Exit(exit_code(message) if code is None else code)


def exit_code(error: object) -> int:
    """2 for a bad value or setting, as for a bad option; 1 for anything else that went wrong."""
    return EXIT_USAGE if isinstance(error, InvalidArgument) else 1


# -- bench ---------------------------------------------------------------------------------


@app.command()
def bench(
    size: Annotated[str, typer.Option(help="model size: 64MB, 1GB, 1.5GiB, 512MiB (binary: 1GB = 2**30 bytes)")]
    = measure.DEFAULT_SIZE,
    # Read as text so that every bad value gets the same one-line answer.
    repeat: Annotated[str, typer.Option(metavar="N", help="timed repeats of each measurement; the table shows medians")]
    = str(measure.DEFAULT_REPEAT),
    json_path: Annotated[Path | None, typer.Option("--json", help="also write every figure to this JSON file")]
    = None,
) -> None:
    """Measure the whole pipeline on this machine against the alternatives, in one table.

    Uses the GPU when one is visible and the emulated backend otherwise.
    """
    try:
        plan = measure.plan(size, repeat, json_path)
    except InvalidArgument as error:
        fail("bench", error)
    try:
        with measure.interrupt_once():
            report = measure.run(plan, lambda line: typer.echo(line, err=True))
    except KeyboardInterrupt:
        fail("bench", "interrupted; its workers, shared memory and files are gone", EXIT_INTERRUPTED)
    except ZeroGPUError as error:
        fail("bench", error)
    Console().print(measure.render(report))
    for line in [*measure.warnings(report), *measure.verdicts(report)]:
        typer.echo(line)
    if plan.json_path is not None:
        plan.json_path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"figures written to {plan.json_path}", err=True)
    if not measure.passed(report):
        fail("bench", "an output differs from zerogpu's: see the 'output' column")


# -- run -----------------------------------------------------------------------------------


@app.command(
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
def run(
    script: Annotated[str, typer.Argument(help="the Python script to run as __main__")],
    args: Annotated[list[str] | None, typer.Argument(help="the script's own arguments")] = None,
) -> None:
    """Run a Python script with zerogpu enabled; `import spaces` in it gets zerogpu's `spaces`.

    An app written for Hugging Face's ZeroGPU runs unchanged on this machine's GPUs.
    """
    raise typer.Exit(run_script(script, list(args or [])))


def run_script(script: str, args: list[str]) -> int:
    """Run `script` as `python script args...` would, after enabling zerogpu; returns its exit code.

    zerogpu is imported and enabled first, so no import order in the script can
    initialize CUDA before the emulation is in place. SystemExit passes through.
    """
    from . import runtime
    from .integrations import spaces

    if not os.path.exists(script):
        # Python's own words for a missing script, and its exit code.
        typer.echo(f"zerogpu run: can't open file {os.path.abspath(script)!r}: "
                   "[Errno 2] No such file or directory", err=True)
        return EXIT_USAGE
    # Calls made with no visitor's identity run on the app's own account, named after the script.
    os.environ.setdefault("ZEROGPU_APP", os.path.abspath(script))
    try:
        runtime.enable()
    except ZeroGPUError as error:
        fail("run", error)
    spaces.install()
    # As Python does: argv[0] as given, __file__ absolute, the script's folder (or the
    # app's, for a folder or zip file with a __main__.py) first on the path.
    path = os.path.abspath(script)
    sys.argv = [script, *args]
    sys.path.insert(0, path if not os.path.isfile(path) or zipfile.is_zipfile(path) else os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except KeyboardInterrupt as error:
        print_script_traceback(error, path)
        return EXIT_INTERRUPTED
    except BaseException as error:  # noqa: BLE001 - reported as Python reports it
        print_script_traceback(error, path)
        return 1
    return 0


def print_script_traceback(error: BaseException, script: str) -> None:
    """The traceback Python prints for `python script`: from the script's first frame on."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename != script:
        frames = frames.tb_next
    traceback.print_exception(type(error), error, frames or error.__traceback__)


# -- info ----------------------------------------------------------------------------------


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="print the facts as JSON")] = False) -> None:
    """What zerogpu sees here: backend, devices, CUDA driver, /dev/shm and its compiled engine.

    Exits 2 when a setting makes the backend unusable (1 for another reason), after saying why.
    """
    facts, error = gather_info()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
    else:
        print_info(facts)
    if error is not None:
        raise typer.Exit(exit_code(error))


def print_info(facts: dict[str, Any]) -> None:
    console = Console()
    console.print(f"zerogpu {facts['zerogpu']} (torch {facts['torch']['version']}, "
                  f"CUDA build {facts['torch']['cuda'] or 'none'})")
    console.print(f"backend: {facts['backend'].get('name') or 'none'}: {facts['backend']['reason']}")
    devices = Table(title="devices", title_justify="left")
    for column in ("#", "name", "memory", "visible as", "driver"):
        devices.add_column(column)
    driver = facts["cuda_driver"]
    for device in facts["devices"]:
        memory = describe_size(device["total_memory"]) if device["total_memory"] else "?"
        devices.add_row(str(device["index"]), device["name"], memory, device["visible_id"],
                        driver.get("version", "-") if device["backend"] == "cuda" else "emulated")
    console.print(devices if facts["devices"] else "devices: none")
    if driver["found"]:
        console.print(f"CUDA driver: {driver['library']} found at {driver.get('path', '?')}, "
                      f"version {driver.get('version', '?')}" + (f" ({driver['error']})" if "error" in driver else ""))
    elif facts["backend"]["name"] == "emulated":
        console.print("no CUDA driver: using the emulated backend")
    elif "cuda" in (facts["backend"]["asked"], facts["backend"]["name"]):
        # Only when the GPU is asked for (or chosen) is the missing driver a problem to solve.
        console.print(f"CUDA driver: {driver['library']} not found ({driver['error']})")
    else:
        console.print(f"no CUDA driver ({driver['library']} not found)")
    shm = facts["shm"]
    console.print(f"/dev/shm: {describe_size(shm['free'])} free of {describe_size(shm['total'])}")
    build = facts["extension"]
    console.print(f"copy engine: built {build['build_type']} by {build['compiler']}, "
                  f"C++{build['cxx_standard'] // 100 % 100}, nanobind {build['nanobind']}")


def gather_info() -> tuple[dict[str, Any], ZeroGPUError | None]:
    """The facts `zerogpu info` shows, and the error that makes the backend unusable, if any."""
    import torch

    from .cuda import devices
    from . import runtime, settings
    from .cuda._ext import _engine
    from .cuda.engine import driver_info

    chosen = failure = None
    try:
        chosen = settings.backend()
        name = runtime.choose_backend()
        reason = (f"ZEROGPU_BACKEND={chosen}" if chosen
                  else "a GPU is visible" if name == "cuda" else "no GPU is visible")
        found = [dataclasses.asdict(device) for device in devices.discover(name)]
    except ZeroGPUError as error:
        name, reason, found, failure = None, str(error), [], error
    shm_free, shm_total = segments.free_space()
    return {
        "zerogpu": measure.package_version("zerogpu"),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "backend": {"name": name, "reason": reason, "asked": chosen},
        "devices": found,
        "cuda_driver": driver_info(),
        "shm": {"free": shm_free, "total": shm_total},
        "extension": dict(_engine.build_info()),
    }, failure


# -- serve and status ----------------------------------------------------------------------


@app.command()
def serve(
    socket: Annotated[str | None, typer.Option(help="the unix socket to serve (default: ZEROGPU_SCHEDULER)")]
    = None,
    quota: Annotated[list[str] | None, typer.Option(
        metavar="TIER=SECONDS", help="daily quota of a tier in large-GPU seconds (repeatable)")] = None,
    max_duration: Annotated[list[str] | None, typer.Option(
        metavar="TIER=SECONDS", help="longest call a tier may ask for (repeatable)")] = None,
    large_per_gpu: Annotated[int, typer.Option(help="large calls sharing one GPU")] = Policy.large_per_gpu,
    aging: Annotated[float, typer.Option(help="seconds of waiting that lift a call one tier")] = DEFAULT_AGING,
    ledger: Annotated[str | None, typer.Option(
        help="the quota ledger: a SQLite file, or postgresql://... shared by a fleet's nodes "
             "(default: ZEROGPU_LEDGER, else a file under ZEROGPU_DATA_DIR)")]
    = None,
    node: Annotated[str | None, typer.Option(help="this node's name in the fleet (default: the host name)")]
    = None,
    node_timeout: Annotated[float, typer.Option(
        help="seconds without a heartbeat after which this node's reservations expire")] = NODE_TIMEOUT,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[str, typer.Option(help="the address the metrics listen on")] = "127.0.0.1",
    heartbeat_timeout: Annotated[float, typer.Option(
        help="seconds of silence after which a client's leases come back (keep it at 3 or more)")]
    = HEARTBEAT_TIMEOUT,
) -> None:
    """Run the node daemon: one scheduler for every zerogpu app of this machine, until Ctrl-C or SIGTERM."""
    from .schedule import daemon
    from . import settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s zerogpu-daemon %(levelname)s %(message)s")
    try:
        policy = Policy(daily_quota=settings.tier_seconds(quota or [], "--quota"),
                        max_duration=settings.tier_seconds(max_duration or [], "--max-duration"),
                        large_per_gpu=large_per_gpu, aging=aging)
        if metrics_port is not None:
            from . import metrics

            endpoint = metrics.serve(metrics_port, metrics_host)
            typer.echo(f"metrics on {endpoint.url}")
        daemon.serve(socket, policy=policy, ledger_path=ledger, heartbeat_timeout=heartbeat_timeout, node=node,
                     node_timeout=node_timeout, ready=lambda running: typer.echo(f"ready {running.socket_path}"))
    except ZeroGPUError as error:
        fail("serve", error)


@app.command()
def status(
    socket: Annotated[str | None, typer.Option(help="the node daemon's socket (default: ZEROGPU_SCHEDULER)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the state as JSON")] = False,
    fleet: Annotated[bool, typer.Option("--fleet", help="every node of the shared ledger, read from it")] = False,
    ledger: Annotated[str | None, typer.Option(
        help="with --fleet: the ledger's postgresql:// URL or file (default: ZEROGPU_LEDGER)")] = None,
) -> None:
    """The GPUs, the leases, the queue and each identity's quota left today."""
    from .schedule.status import fleet_status, render_fleet, render_status
    from .schedule.status import status as read_status

    try:
        state = fleet_status(ledger) if fleet else read_status(socket)
    except ZeroGPUError as error:
        fail("status", error)
    if as_json:
        typer.echo(json.dumps(state, indent=2, default=str))
    else:
        Console().print(render_fleet(state) if fleet else render_status(state))


# -- quota ----------------------------------------------------------------------------------

quota_app = typer.Typer(help="The daily GPU quotas of the quota ledger.", no_args_is_help=True)
app.add_typer(quota_app, name="quota")


@quota_app.command("reset")
def quota_reset(
    user: Annotated[str | None, typer.Argument(
        metavar="USER", help="the account to reset (every tier of it); all when left out")]
    = None,
    socket: Annotated[str | None, typer.Option(help="the node daemon's socket (default: ZEROGPU_SCHEDULER)")]
    = None,
    ledger: Annotated[Path | None, typer.Option(
        help="the quota database, when no daemon runs (default: under ZEROGPU_DATA_DIR)")] = None,
) -> None:
    """Give back today's quota: of one account, or of every account.

    Only the owner of the ledger may: through a node daemon, the user it runs as;
    otherwise the user who owns the ledger's file. Calls running now keep their
    reservation and are charged when they end.
    """
    from . import settings

    try:
        path = socket or settings.scheduler_socket()
        if path and ledger is not None:
            raise InvalidArgument("give --socket (or ZEROGPU_SCHEDULER) or --ledger, not both: "
                                  "a node daemon resets the ledger it serves")
        reset = reset_through_daemon(path, user) if path else reset_ledger(ledger, user)
    except ZeroGPUError as error:
        fail("quota reset", error)
    if user is None:
        typer.echo(f"quota reset: {reset} account{'s' if reset != 1 else ''} had used quota today")
    elif reset:
        typer.echo(f"quota reset: {user!r} has its whole daily quota again")
    else:
        fail("quota reset", f"{user!r} has used no quota today: nothing to reset (`zerogpu status` lists "
                            "the accounts)")


def reset_through_daemon(path: str, user: str | None) -> int:
    from .schedule.client import DaemonClient

    client = DaemonClient(path)
    try:
        return client.reset_quota(user)
    finally:
        client.close()


def reset_ledger(path: Path | None, user: str | None) -> int:
    from .schedule.policy import Policy
    from .schedule.quota_sqlite import SQLiteLedger, default_path

    path = path or default_path()
    try:
        owner = path.stat().st_uid
    except FileNotFoundError:
        raise InvalidArgument(f"there is no quota ledger at {path}: no quota was used there yet") from None
    except OSError as error:
        raise SchedulerError(f"cannot read the quota ledger {path}: {error}") from None
    if owner != os.getuid():
        raise SchedulerError(f"the quota ledger {path} belongs to uid {owner}, not to this user "
                             f"(uid {os.getuid()}): only its owner may reset its quotas")
    ledger = SQLiteLedger(path, Policy())
    try:
        return ledger.reset(user)
    finally:
        ledger.close()


def main() -> None:
    """The console script `zerogpu`."""
    app(prog_name="zerogpu")


if __name__ == "__main__":
    main()
