"""Prometheus metrics of the calls and the scheduler of this process.

`zerogpu serve --metrics-port PORT` serves the node daemon's; an app without
a daemon calls `zerogpu.metrics.serve(port)`. Both listen on 127.0.0.1
unless given another address. prometheus_client (`pip install
'zerogpu[metrics]'`) is imported only here, when metrics are asked for.

- zerogpu_calls_total{outcome}: ok, error, crashed, timeout, quota, no_gpu, cancelled
- zerogpu_call_seconds{phase}: queue, fork, attach, restore, run, return (histograms)
- zerogpu_warm_calls_total: calls served by a worker that was idle with the weights restored
- zerogpu_leases_held, zerogpu_waiting_calls: the scheduler's leases and queue now
- zerogpu_gpu_busy_slot_seconds_total{gpu}: seconds each GPU's slices spent running calls, summed
- zerogpu_quota_refusals_total{tier}: admissions refused for lack of quota
- zerogpu_restore_bytes_total: bytes of weights restored onto GPUs
"""

from __future__ import annotations

import threading
from typing import Any

from . import telemetry
from .errors import InvalidArgument, ZeroGPUError

DEFAULT_HOST = "127.0.0.1"
# Phases last from milliseconds (a warm call's queue) to minutes (a long run).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))

_lock = threading.Lock()
_installed: Metrics | None = None


def prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ZeroGPUError("metrics need prometheus_client: pip install 'zerogpu[metrics]'") from None
    return prometheus_client


class Metrics:
    """The metric objects, fed by zerogpu.telemetry, in one prometheus_client registry."""

    def __init__(self, registry: Any) -> None:
        client = prometheus()
        self.registry = registry
        self.calls = client.Counter("zerogpu_calls", "Calls ended, by outcome", ["outcome"], registry=registry)
        self.seconds = client.Histogram("zerogpu_call_seconds", "Seconds calls spent in each phase", ["phase"],
                                        buckets=BUCKETS, registry=registry)
        self.warm = client.Counter("zerogpu_warm_calls", "Calls served by a warm worker", registry=registry)
        self.refusals = client.Counter("zerogpu_quota_refusals", "Admissions refused for lack of quota, by tier",
                                       ["tier"], registry=registry)
        self.restored = client.Counter("zerogpu_restore_bytes", "Bytes of weights restored onto GPUs",
                                       registry=registry)
        for outcome in telemetry.OUTCOMES:
            self.calls.labels(outcome)
        registry.register(SchedulerCollector())

    def call_ended(self, outcome: str, phases: dict[str, float], warm: bool, restored_bytes: int) -> None:
        self.calls.labels(outcome).inc()
        for phase, seconds in phases.items():
            self.seconds.labels(phase).observe(max(seconds, 0.0))
        if warm:
            self.warm.inc()
        if restored_bytes:
            self.restored.inc(restored_bytes)

    def quota_refused(self, tier: str) -> None:
        self.refusals.labels(tier).inc()


class SchedulerCollector:
    """The gauges and busy time of this process's schedulers, read at each scrape."""

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        held = GaugeMetricFamily("zerogpu_leases_held", "Leases held now (running or warm)")
        waiting = GaugeMetricFamily("zerogpu_waiting_calls", "Calls waiting for a GPU now")
        busy = CounterMetricFamily("zerogpu_gpu_busy_slot_seconds", "Seconds of GPU slices running calls, per GPU",
                                   labels=["gpu"])
        leases = queued = 0
        seconds: dict[int, float] = {}
        for scheduler in telemetry.schedulers():
            try:
                gauges = scheduler.gauges()
            except ZeroGPUError:
                continue
            leases += gauges["leases_held"]
            queued += gauges["waiting_calls"]
            for gpu, value in gauges["busy_slot_seconds"].items():
                seconds[gpu] = seconds.get(gpu, 0.0) + value
        held.add_metric([], leases)
        waiting.add_metric([], queued)
        for gpu in sorted(seconds):
            busy.add_metric([str(gpu)], seconds[gpu])
        yield from (held, waiting, busy)


def install(registry: Any = None) -> Metrics:
    """Register zerogpu's metrics (once per process) in `registry` (default: prometheus_client's)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = Metrics(registry if registry is not None else prometheus().REGISTRY)
            telemetry.listen(_installed)
        elif registry is not None and registry is not _installed.registry:
            raise InvalidArgument("zerogpu's metrics are already registered in another registry")
        return _installed


class Server:
    """A running metrics endpoint; stop() closes it."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve(port: int, host: str = DEFAULT_HOST) -> Server:
    """Serve the metrics on http://host:port/metrics (port 0: any free port), from a thread."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgument(f"the metrics port must be a number from 0 to 65535, not {port!r}")
    metrics = install()
    try:
        httpd, thread = prometheus().start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise ZeroGPUError(f"cannot serve metrics on {host}:{port}: {error}; choose another port") from error
    return Server(httpd, thread)
