"""A real Gradio app under `zerogpu run`, on 127.0.0.1 and a free port, for the Gradio tests.

One app serves a whole test module (starting one takes seconds), so the
modules mark their tests `allow_leaks` and `GradioServer.stop` does the
leak check instead, once the app is gone: no process of its group is left,
and no shared-memory segment of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from conftest import zerogpu_segments

ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
# Hang guards only: nothing asserts on how long anything took.
START_TIMEOUT = 180
STOP_TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zerogpu_command() -> list[str]:
    script = Path(sys.executable).with_name("zerogpu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "zerogpu.cli"]


@dataclass
class GradioServer:
    app: Path
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.tmp / "server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "GradioServer":
        self.segments_before = zerogpu_segments()
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "ZEROGPU_BACKEND": "emulated",
            "ZEROGPU_DATA_DIR": str(self.tmp / "data"),
            "ZEROGPU_EMULATED_GPUS": "1",
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        for name in ("ZEROGPU", "ZEROGPU_SCHEDULER", "ZEROGPU_IDLE_TIMEOUT", "ZEROGPU_EMULATED_FAULTS",
                     "ZEROGPU_TIMEOUT_GRACE"):
            if name not in self.env:
                env.pop(name, None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([*zerogpu_command(), "run", str(self.app)], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the app exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/gradio_api/info", timeout=2).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(check=False)
        raise AssertionError(f"the app did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self, check: bool = True) -> None:
        """Stop the app as Ctrl-C would; then nothing of it may be left."""
        process = self.process
        if process is None:
            return
        self.process = None
        group = process.pid
        if process.poll() is None:
            os.killpg(group, signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                process.wait()
        left = [p.pid for p in psutil.process_iter(["pid"]) if _group_of(p.pid) == group]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        # The app's own segments: those of other dead processes may be another test run's.
        leaked = {name for name in zerogpu_segments() - self.segments_before
                  if name.startswith(f"zerogpu-{group}-")}
        for name in leaked:
            os.unlink(os.path.join("/dev/shm", name))
        if check:
            assert not left, f"processes of the app outlived it: {left}"
            assert not leaked, f"shared-memory segments outlived the app: {sorted(leaked)}"


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def updates(job, until=None, timeout: float = 120) -> list:
    """The updates of a gradio_client job, in the order the server sent them.

    Until the job is done, or until an update for which `until(update)` is
    true. The job's queue is read without an event loop, so one job can be
    read in several goes. The timeout is a hang guard, not a measure.
    """
    queue = job.communicator.updates
    read: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            update = queue.get_nowait()
        except asyncio.QueueEmpty:
            if job.done() and queue.empty():
                return read
            time.sleep(0.02)
            continue
        read.append(update)
        if until is not None and until(update):
            return read
    raise AssertionError(f"the job gave no end within {timeout} s; updates so far: {read}")


def shown(text: str):
    """A test for `updates(until=...)`: the update shows the toast `text`."""
    return lambda update: bool(getattr(update, "log", None)) and update.log[0] == text


def logs(collected: list) -> list[tuple[str, str]]:
    """The (message, level) of each gr.Info, gr.Warning and zerogpu notice among `collected`."""
    return [update.log for update in collected if getattr(update, "log", None)]


def progress(collected: list) -> list[tuple]:
    """The (desc, index, length) of the innermost bar of each progress update among `collected`."""
    return [(unit.desc, unit.index, unit.length)
            for update in collected if getattr(update, "progress_data", None)
            for unit in update.progress_data[-1:]]
