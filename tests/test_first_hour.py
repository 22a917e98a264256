"""What a newcomer meets first on a machine without a GPU: the errors, `zerogpu info`, help, status, the daemon.

Each test runs what a user would run (a script, or the `zerogpu` command) and
checks the words and the exit code they get.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zerogpu import hints, runtime
from zerogpu.cli import app

from conftest import emulated_environment

HINT = hints.CUDA_HINT
NO_CUDA = "AssertionError: Torch not compiled with CUDA enabled"


@pytest.fixture
def env(tmp_path, monkeypatch):
    emulated_environment(monkeypatch, tmp_path)
    return tmp_path


def python(script: str, tmp_path, **environ: str) -> subprocess.CompletedProcess:
    """Run `script` as `python app.py` in the test's environment (plus `environ`)."""
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **environ}, cwd=tmp_path)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


# -- CUDA touched before zerogpu is enabled ------------------------------------------------------


@pytest.mark.slow
def test_moving_a_model_to_cuda_before_enabling_says_what_to_do(env):
    done = python("""
        import torch
        import zerogpu
        model = torch.nn.Linear(4, 4).to("cuda")
    """, env)
    assert done.returncode == 1
    # torch's own error, then the hint: added to it, not in its place.
    assert done.stderr.rstrip().endswith(f"{NO_CUDA}\n{HINT}"), done.stderr
    assert "Traceback (most recent call last)" in done.stderr


@pytest.mark.slow
def test_a_decorated_function_called_before_enabling_says_what_to_do_in_a_thread_too(env):
    # Off, @GPU returns the function unchanged: in a thread its error reaches threading.excepthook,
    # in the main thread sys.excepthook; an error the app catches is left as torch raised it.
    done = python("""
        import threading, torch, zerogpu

        @zerogpu.GPU
        def infer():
            return torch.ones(2).to("cuda")

        worker = threading.Thread(target=infer)
        worker.start()
        worker.join()
        try:
            infer()
        except AssertionError as error:
            print(type(error).__name__, error.args, getattr(error, "__notes__", None))
        infer()
    """, env)
    assert done.returncode == 1
    assert done.stdout == "AssertionError ('Torch not compiled with CUDA enabled',) None\n"
    assert done.stderr.count(f"{NO_CUDA}\n{HINT}") == 2, done.stderr
    assert "Exception in thread" in done.stderr


def report(error: BaseException, capsys) -> str:
    """What Python prints for `error` left uncaught in the main thread."""
    sys.excepthook(type(error), error, error.__traceback__)
    return capsys.readouterr().err


def raised(make) -> BaseException:
    try:
        make()
    except BaseException as error:  # noqa: BLE001 - the error to report
        return error
    raise AssertionError("nothing was raised")


def test_the_hint_goes_on_the_error_a_torch_error_was_raised_from(env, capsys):
    import torch

    def load():
        try:
            torch.zeros(1, device="cuda")
        except AssertionError as error:
            raise RuntimeError("loading the model failed") from error

    text = report(raised(load), capsys)
    assert f"{NO_CUDA}\n{HINT}" in text
    assert text.rstrip().endswith("RuntimeError: loading the model failed")


def test_no_hint_once_zerogpu_is_enabled_or_for_other_errors(gpu, capsys):
    import torch

    assert torch.zeros(1).to("cuda").device.type == "cuda"
    text = report(AssertionError("Torch not compiled with CUDA enabled"), capsys)
    assert text.rstrip().endswith("AssertionError: Torch not compiled with CUDA enabled") and HINT not in text
    runtime.disable()
    text = report(AssertionError("the app's own check"), capsys)
    assert text.rstrip().endswith("AssertionError: the app's own check") and HINT not in text


def test_explain_notes_once(env):
    error = AssertionError("Torch not compiled with CUDA enabled")
    hints.explain(error)
    hints.explain(error)
    assert error.__notes__ == [HINT]
    assert error.args == ("Torch not compiled with CUDA enabled",)


# -- a bad setting at import ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_bad_setting_at_import_is_one_line_and_can_still_be_caught(env):
    done = python("""
        try:
            import zerogpu
        except ValueError as error:
            print(type(error).__name__, error)
        import zerogpu  # the same error, uncaught
    """, env, ZEROGPU="1", ZEROGPU_BACKEND="bogus")
    assert done.returncode == 1
    assert done.stdout == "InvalidArgument ZEROGPU_BACKEND='bogus' is unknown: use 'cuda' or 'emulated'\n"
    assert done.stderr == "zerogpu: ZEROGPU_BACKEND='bogus' is unknown: use 'cuda' or 'emulated'\n"


@pytest.mark.parametrize("args", [["status"], ["serve", "--socket", "{tmp}/d.sock"], ["run", "{tmp}/app.py"],
                                  ["bench", "--size", "1MB", "--repeat", "1"]])
def test_a_bad_setting_is_one_line_and_exit_2_in_every_command(env, monkeypatch, args):
    (env / "app.py").write_text("print('ran')\n")
    monkeypatch.setenv("ZEROGPU_BACKEND", "bogus")
    result = invoke([arg.format(tmp=env) for arg in args])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"zerogpu {args[0]}: ZEROGPU_BACKEND='bogus' is unknown: use 'cuda' or 'emulated'\n"
    assert "ran" not in result.stdout


# -- zerogpu info --------------------------------------------------------------------------------


def test_info_on_the_emulated_backend_says_no_driver_in_one_line(env):
    result = invoke(["info"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "no CUDA driver: using the emulated backend" in lines
    assert "Install the NVIDIA driver" not in result.stdout and "libcuda" not in result.stdout


def test_info_gives_the_driver_advice_when_cuda_was_asked_for_and_exits_non_zero(env, monkeypatch):
    monkeypatch.setenv("ZEROGPU_BACKEND", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, even on a machine with one
    result = invoke(["info"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stdout.split())
    assert "backend: none: ZEROGPU_BACKEND=cuda but no NVIDIA GPU is visible" in text
    assert "CUDA driver: libcuda.so.1" in text


@pytest.mark.parametrize("as_json", [False, True])
def test_info_exits_non_zero_for_an_unknown_backend(env, monkeypatch, as_json):
    monkeypatch.setenv("ZEROGPU_BACKEND", "bogus")
    result = invoke(["info", "--json"] if as_json else ["info"])
    assert result.exit_code == 2
    assert "ZEROGPU_BACKEND='bogus' is unknown" in result.stdout
    if not as_json:
        assert "backend: none: ZEROGPU_BACKEND='bogus' is unknown" in " ".join(result.stdout.split())


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, flags", [
    ([], ["--help"]), (["info"], ["--json", "--help"]), (["status"], ["--json", "--help"]), (["bench"], ["--help"]),
    (["serve"], ["--help"]), (["quota"], ["--help"]), (["quota", "reset"], ["--help"]),
])
def test_help_shows_flags_as_flags(env, command, flags):
    result = invoke([*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.startswith("  --")}
    for flag in flags:
        assert not rows[flag].startswith("<"), rows  # its help text follows: it takes no value
    if command == ["bench"]:
        assert rows["--json"] == "<path>" and rows["--size"] == "<str>"  # options that take one say so


# -- the node daemon: status and stopping ------------------------------------------------------


class Served:
    """`zerogpu serve` as a real process on a socket of its own."""

    def __init__(self, folder: str) -> None:
        self.socket = os.path.join(folder, "d.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zerogpu.cli", "serve", "--socket", self.socket,
             "--ledger", os.path.join(folder, "quota.sqlite3")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
        )
        line = self.proc.stdout.readline()
        assert line == f"ready {self.socket}\n", line + self.proc.stderr.read()

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        """Send `signum`; the exit code and what the daemon wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def served(env):
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path.
    folder = tempfile.mkdtemp(prefix="zg-", dir="/tmp")
    daemon = Served(folder)
    yield daemon
    daemon.stop(signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_status_does_not_count_its_own_connection(served):
    from zerogpu.schedule.client import DaemonClient

    result = invoke(["status", "--socket", served.socket])
    assert result.exit_code == 0, result.output
    assert f"on {served.socket}, 0 apps connected" in " ".join(result.stdout.split())
    app_client = DaemonClient(served.socket)
    try:
        app_client.status()  # connected, as an app is
        text = " ".join(invoke(["status", "--socket", served.socket]).stdout.split())
        assert "1 app connected" in text
        state = json.loads(invoke(["status", "--socket", served.socket, "--json"]).stdout)
        assert state["daemon"]["clients"] == [os.getpid()]
    finally:
        app_client.close()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_daemon_says_it_stopped_and_on_which_signal(served, signum):
    code, err = served.stop(signum)
    assert code == 0
    last = err.strip().splitlines()[-1]
    assert f"stopped on {signal.Signals(signum).name}: no longer serving {served.socket}" in last, err
    assert not os.path.exists(served.socket)


def test_the_readme_says_how_to_stop_the_daemon_and_run_the_quick_tests():
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "stops it" in readme and "kill <pid>" in readme
    assert 'pytest -m "not slow"' in readme


@pytest.mark.slow
def test_the_slow_marker_selects(env):
    def collected(*args: str) -> set[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *args, "tests/schedule/test_daemon.py"], capture_output=True, text=True,
                              timeout=300, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stdout + done.stderr
        return {line for line in done.stdout.splitlines() if "::" in line}

    everything, slow, quick = collected(), collected("-m", "slow"), collected("-m", "not slow")
    assert slow and quick and not slow & quick and slow | quick == everything
    assert any("test_leases_through_the_daemon" in test for test in slow)  # starts a daemon
    assert any("test_wire_frames_round_trip" in test for test in quick)
