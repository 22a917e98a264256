"""zerogpu's own path: the pack, cold and warm calls through the decorator, and each copy-engine strategy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .arguments import Plan
from .model import Stack, compare, median_of, run_with, worst

CALL_DURATION = 600.0  # seconds each bench call may take: a large model on a slow machine
BENCH_QUOTA = 1e9  # GPU seconds the bench's private ledger allows: never the limit
WARM_IDLE = 600.0  # seconds a warm worker waits for the next call while the bench runs
PHASES = ("queue", "fork", "attach", "restore", "run", "return", "release")


@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the block (the runtime reads its settings from there)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def timed_call(function: Callable, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """One call of a decorated function, driven as the decorator does, with its phases.

    `total` is what the caller waits; the phases are the call's own (see
    Call.phases; `release` is the reaping of the worker, or its parking, and
    the lease's release); `other` whatever they leave (pickling the
    arguments, messages in flight).
    """
    from ..call.call import Call

    started = time.perf_counter()
    call = Call(function.zerogpu, (x,), {})
    call.start()
    messages = call.messages()
    result = returned = None
    try:
        for verb, value in messages:
            if verb == "return":
                result, returned = value, time.perf_counter()
                break
    finally:
        messages.close()  # ends the call
    ended = time.perf_counter()
    if returned is None:
        raise AssertionError("a call ended without a result")  # pragma: no cover - Call raises instead
    phases = {name: call.phases[name] for name in PHASES if name in call.phases}
    phases["other"] = (ended - started) - sum(phases.values())
    # A warm call is served by a worker that was already running: it has no fork.
    figures: dict[str, Any] = {"total": ended - started, "warm": "fork" not in phases, "phases": phases}
    stats = call.phases.get("restore_stats")
    if stats:
        figures["restore_stats"] = stats
    return result, figures


def summarize_calls(calls: list[dict[str, Any]], reference: torch.Tensor, outputs: list[torch.Tensor],
                    nbytes: int) -> dict[str, Any]:
    summary = median_of([call["total"] for call in calls])
    summary["phases"] = {name: median_of([call["phases"][name] for call in calls])
                         for name in calls[0]["phases"]}
    if "restore" in summary["phases"]:
        summary["restore_gbps"] = nbytes / summary["phases"]["restore"]["median"] / 1e9
        summary["restore_strategy"] = calls[0]["restore_stats"][0]["strategy"]
        summary["restore_stats"] = [call["restore_stats"] for call in calls]
        # What each worker paid to pin host memory: the staging ring (setup) or registering chunks.
        summary["pinning"] = median_of([sum(stats["setup_seconds"] + stats["register_seconds"]
                                            for stats in call["restore_stats"]) for call in calls])
    summary["warm"] = [call["warm"] for call in calls]
    summary["output"] = worst([compare(output, reference) for output in outputs])
    return summary


def measure_zerogpu(plan: Plan, model: Stack, x: torch.Tensor, ledger: Path, say: Callable[[str], None],
                    rivals: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                    labels: dict[str, str] | None = None) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """Pack, then cold calls, warm calls and each of `rivals` in turn; leaves zerogpu disabled again."""
    rivals, labels = rivals or {}, labels or {}
    import zerogpu

    from ..cuda import devices
    from .. import runtime
    from ..schedule.policy import Policy
    from ..schedule.quota_sqlite import SQLiteLedger
    from ..schedule.choice import use_scheduler
    from ..schedule.scheduler import EmbeddedScheduler

    # The decorator keeps the functions it decorated for the life of the process; holding
    # the model through this dict, emptied below, lets its snapshot go when the bench is done.
    held: dict[str, Stack] = {}
    zerogpu.enable()
    try:
        # A private ledger with room to spare: the bench must not spend the user's quota.
        policy = Policy(daily_quota={"anonymous": BENCH_QUOTA})
        use_scheduler(EmbeddedScheduler(devices.discover(runtime.backend()),
                                        ledger=SQLiteLedger(ledger, policy=policy)))
        model.to("cuda")
        held["model"] = model

        # Half a GPU each: the warm worker keeps its half while the cold calls take the other.
        @zerogpu.GPU(duration=CALL_DURATION, size="large")
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return held["model"](x.to("cuda")).cpu()

        @zerogpu.GPU(duration=CALL_DURATION, size="large")
        def forward_warm(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return held["model"](x.to("cuda")).cpu()

        say("zerogpu: packing the weights into shared memory")
        started = time.perf_counter()
        packed = zerogpu.startup(progress=lambda nbytes: None)  # no bar: the bench times the pack itself
        pack = median_of([time.perf_counter() - started])
        pack["bytes"] = packed
        pack["gbps"] = packed / pack["median"] / 1e9

        cold, cold_outputs, warm, warm_outputs = [], [], [], []
        rounds: dict[str, list[float]] = {name: [] for name in rivals}
        rival_outputs: dict[str, list[torch.Tensor]] = {name: [] for name in rivals}
        # Cold calls need workers that exit after their call, whatever the environment says.
        with environment("ZEROGPU_IDLE_TIMEOUT", "0"):
            say("zerogpu: a first call through the decorated function (not timed)")
            reference = forward(x)
        with environment("ZEROGPU_IDLE_TIMEOUT", str(WARM_IDLE)):
            say("zerogpu: a call that leaves its worker warm (not timed)")
            forward_warm(x)
        for name, rival in rivals.items():
            say(f"alternatives: {labels[name]} (first call, not timed)")
            rival(x)
        # Every row in turn, round after round: the machine's load falls on all of them alike.
        for i in range(plan.repeat):
            with environment("ZEROGPU_IDLE_TIMEOUT", "0"):
                say(f"zerogpu: cold call {i + 1}/{plan.repeat}")
                output, figures = timed_call(forward, x)
                cold.append(figures)
                cold_outputs.append(output)
            with environment("ZEROGPU_IDLE_TIMEOUT", str(WARM_IDLE)):
                say(f"zerogpu: warm call {i + 1}/{plan.repeat}")
                output, figures = timed_call(forward_warm, x)
                warm.append(figures)
                warm_outputs.append(output)
            for name, rival in rivals.items():
                say(f"alternatives: {labels[name]} {i + 1}/{plan.repeat}")
                started = time.perf_counter()
                rival_outputs[name].append(rival(x))
                rounds[name].append(time.perf_counter() - started)
    finally:
        runtime.disable()
        held.clear()
    measured_rivals = {}
    for name, seconds in rounds.items():
        measured_rivals[name] = median_of(seconds)
        measured_rivals[name]["label"] = labels[name]
        measured_rivals[name]["output"] = worst([compare(output, reference) for output in rival_outputs[name]])
    return reference, {
        "pack": pack,
        "cold_call": summarize_calls(cold, reference, cold_outputs, packed),
        "warm_call": summarize_calls(warm, reference, warm_outputs, packed),
    }, measured_rivals


def measure_strategies(plan: Plan, weights_file: Path, shape: Stack, x: torch.Tensor, reference: torch.Tensor,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """Each copy-engine strategy restoring the same snapshot into one device buffer."""
    from ..cuda.engine import STRATEGIES, Engine
    from ..snapshot.snapshot import Snapshot

    seconds: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
    verdicts: dict[str, str] = {}
    with Snapshot.load_safetensors(weights_file) as snapshot, Engine(plan.backend) as engine:
        buffer = engine.alloc_buffer(snapshot.nbytes)
        for i in range(plan.repeat):
            for strategy in STRATEGIES:
                say(f"copy engine: {strategy} restore {i + 1}/{plan.repeat}")
                if i == 0:
                    # Start from zeros, so the output check sees this strategy's copy.
                    buffer.zero_()
                    if plan.backend == "cuda":
                        torch.cuda.synchronize()
                stats = engine.restore(snapshot.address, buffer.data_ptr(), snapshot.nbytes, strategy=strategy)
                seconds[strategy].append(stats.seconds)
                if i == 0:
                    verdicts[strategy] = compare(run_with(shape, snapshot.views(buffer), x), reference)
        nbytes = snapshot.nbytes
        del buffer
    results = {}
    for strategy in STRATEGIES:
        results[strategy] = median_of(seconds[strategy])
        results[strategy]["gbps"] = nbytes / results[strategy]["median"] / 1e9
        results[strategy]["output"] = verdicts[strategy]
    return results
