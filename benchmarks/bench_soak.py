"""The soak: many mixed calls in one process, and what the process holds as they go.

    python benchmarks/bench_soak.py [--calls N] [--every N] [--json PATH]

`--calls` calls (10,000 by default) on 2 emulated GPUs, cycling through the
kinds of call an app makes: a small result, a large result (8 MB, through a
shared-memory segment), a stream, a call that raises, a warm call, a call
past its duration, a worker that crashes, and a call that starts and
detaches a grandchild. Every `--every` calls (1,000) it records the parent's
resident memory, open descriptors, threads, live descendant processes and
zerogpu segments of this run in /dev/shm. Expected: all flat, the ones that
count processes and segments at zero between calls.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import sys
import time
from pathlib import Path

# Before zerogpu is imported: this run's segments are told from any other's by their tag.
os.environ.setdefault("ZEROGPU_SEGMENT_TAG", secrets.token_hex(4))
os.environ.setdefault("ZEROGPU_BACKEND", "emulated")
os.environ.setdefault("ZEROGPU_EMULATED_GPUS", "2")
os.environ.setdefault("ZEROGPU_TIMEOUT_GRACE", "0.2")
os.environ.setdefault("ZEROGPU_QUOTA", "anonymous=100000000")

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

import zerogpu  # noqa: E402
from zerogpu.call.teardown import teardown  # noqa: E402
from zerogpu.snapshot import segments  # noqa: E402


def holdings() -> dict:
    process = psutil.Process()
    children = [c for c in process.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    tag = segments.tag()
    mine = [name for name, _, kind in segments.listed() if name.split("-", 2)[2].removeprefix(kind).startswith(tag)]
    return {
        "rss_mb": round(process.memory_info().rss / 2**20, 1),
        "fds": process.num_fds(),
        "threads": process.num_threads(),
        "children": len(children),
        "segments": len(mine),
    }


def calls() -> list:
    model = torch.nn.Linear(256, 256).to("cuda")

    @zerogpu.GPU(duration=20)
    def small(x):
        return model(x.to("cuda")).sum().item()

    @zerogpu.GPU(duration=20)
    def large():
        return torch.ones(2 << 20)  # 8 MB: a result segment

    @zerogpu.GPU(duration=20)
    def stream(n):
        yield from range(n)

    @zerogpu.GPU(duration=20)
    def raises():
        raise ValueError("expected")

    @zerogpu.GPU(duration=1)
    def too_long():
        time.sleep(30)

    @zerogpu.GPU(duration=20)
    def crashes():
        os._exit(3)

    @zerogpu.GPU(duration=20)
    def detaches():
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        return "detached"

    x = torch.randn(4, 256)

    def expect(error, fn, *args):
        def run():
            try:
                fn(*args)
            except error:
                return
            raise AssertionError(f"{fn} did not raise {error}")
        return run

    return [
        ("small", lambda: small(x)),
        ("large", lambda: large().sum().item()),
        ("stream", lambda: list(stream(5))),
        ("raises", expect(ValueError, raises)),
        ("small", lambda: small(x)),
        # Past its deadline: in attach or restore too, on a loaded machine.
        ("timeout", expect((zerogpu.CallTimeout, zerogpu.AttachError, zerogpu.RestoreError), too_long)),
        ("crash", expect(zerogpu.WorkerCrashed, crashes)),
        ("detach", detaches),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="keeps warm calls in the mix")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.every < 1:
        parser.error("--calls and --every must be positive")
    os.environ["ZEROGPU_IDLE_TIMEOUT"] = str(args.idle_timeout)
    out = report.console()
    zerogpu.enable()
    mix = calls()
    zerogpu.startup()
    rows = []
    started = time.monotonic()
    kinds: dict[str, int] = {}
    for index in range(args.calls):
        kind, run = mix[index % len(mix)]
        run()
        kinds[kind] = kinds.get(kind, 0) + 1
        if (index + 1) % args.every == 0 or index + 1 == args.calls:
            teardown.wait()
            gc.collect()  # what stays after a collection is a leak; what goes was garbage
            row = {"calls": index + 1, "seconds": round(time.monotonic() - started, 1), **holdings()}
            rows.append(row)
            out.print(row)
    from zerogpu import runtime

    runtime.disable()
    after = holdings()
    out.print({"after disable": after})
    first, last = rows[0], rows[-1]
    verdict = {
        key: f"{first[key]} -> {last[key]}" for key in ("rss_mb", "fds", "threads", "children", "segments")
    }
    out.print({"first to last checkpoint": verdict})
    if args.json is not None:
        figures = {"machine": report.machine(), "command": report.command_line(argv), "kinds": kinds,
                   "checkpoints": rows, "after_disable": after}
        report.write_figures(args.json, figures, out)


if __name__ == "__main__":
    main()
