"""The `zerogpu` command, through typer's test runner and as real processes.

Everything runs on the emulated backend with a private quota file; the bench
writes its files under each test's own temporary folder, so a test can check
that nothing is left there.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from typer.testing import CliRunner

from zerogpu import bench, runtime
from zerogpu.bench import arguments as bench_arguments
from zerogpu.cli import app
from zerogpu.cuda.engine import STRATEGIES

from conftest import emulated_environment

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COLD_PHASES = {"queue", "fork", "attach", "restore", "run", "return", "release", "other"}
WARM_PHASES = {"queue", "run", "return", "release", "other"}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The environment of a zerogpu process here: emulated, private quota file, own temporary folder."""
    emulated_environment(monkeypatch, tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    # tempfile remembers the folder it chose first; make it choose again.
    monkeypatch.setattr(tempfile, "tempdir", None)
    yield SimpleNamespace(scratch=scratch, tmp=tmp_path, environ=dict(os.environ))
    runtime.disable()


def zerogpu_command() -> list[str]:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("zerogpu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "zerogpu.cli"]


# Only a hang guard: how long a command takes is for the machine's load to say, not the test.
HANG_GUARD = 1200


def run_command(args: list[str], env: SimpleNamespace, timeout: float = HANG_GUARD) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env.environ, capture_output=True, text=True, timeout=timeout, cwd=env.tmp)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def segments_of(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"zerogpu-{pid}-")]


# -- zerogpu bench ---------------------------------------------------------------------------


def check_report(report: dict, repeat: int) -> None:
    """Every figure the bench promises is there, consistent and measured."""
    assert report["backend"] == "emulated"
    assert report["repeat"] == repeat
    assert set(report["machine"]) == {"platform", "processor", "cpus", "memory_bytes", "python", "torch"}
    model = report["model"]
    assert model["bytes"] == model["layers"] * (model["width"] ** 2 + model["width"]) * 4
    assert model["tensors"] == 2 * model["layers"]

    pack = report["pack"]
    assert len(pack["seconds"]) == 1 and pack["median"] > 0
    assert pack["bytes"] >= model["bytes"]
    assert math.isclose(pack["gbps"], pack["bytes"] / pack["median"] / 1e9)

    for key, phases, warm in (("cold_call", COLD_PHASES, False), ("warm_call", WARM_PHASES, True)):
        call = report[key]
        assert len(call["seconds"]) == repeat and call["median"] > 0
        assert set(call["phases"]) == phases
        for i, total in enumerate(call["seconds"]):
            # The phases account for the whole call, each of them measured.
            assert math.isclose(sum(call["phases"][name]["seconds"][i] for name in phases), total, rel_tol=1e-9)
            assert all(call["phases"][name]["seconds"][i] > 0 for name in phases - {"other"})
        assert call["warm"] == [warm] * repeat
        assert call["output"] == "identical"
    cold = report["cold_call"]
    assert cold["restore_strategy"] in STRATEGIES
    assert cold["restore_gbps"] > 0
    assert all(stats[0]["nbytes"] == pack["bytes"] for stats in cold["restore_stats"])

    assert set(report["restore_strategies"]) == set(STRATEGIES)
    for figures in report["restore_strategies"].values():
        assert len(figures["seconds"]) == repeat and figures["gbps"] > 0
        assert figures["output"] == "identical"

    assert set(report["alternatives"]) == set(bench.ALTERNATIVES)
    for name, figures in report["alternatives"].items():
        assert figures["label"] == bench.ALTERNATIVES[name]
        assert len(figures["seconds"]) == repeat and figures["median"] > 0
        assert math.isclose(figures["ratio_to_cold"], figures["median"] / cold["median"])
        assert math.isclose(figures["ratio_to_warm"], figures["median"] / report["warm_call"]["median"])
        # Another process computes with its own memory layout: its last bits may differ.
        assert figures["output"] == "identical" or figures["output"].startswith("close"), figures["output"]
    assert isinstance(report["alternatives"]["buffered_file"]["o_direct"], bool)
    # The process-per-call designs, timed in turn with zerogpu's calls; ranges beside medians.
    assert {"fork_to_device", "loaded_pool"} <= set(report["alternatives"])
    for figures in [cold, report["warm_call"], *report["alternatives"].values()]:
        assert figures["min"] == min(figures["seconds"]) and figures["max"] == max(figures["seconds"])
    assert len(cold["pinning"]["seconds"]) == repeat and cold["pinning"]["median"] >= 0
    assert set(report["load_average"]) == {"before", "after"}
    assert all(len(report["load_average"][when]) == 3 for when in ("before", "after"))


def check_verdicts(stdout: str, report: dict) -> None:
    """One verdict line per alternative, after the table."""
    lines = [line for line in stdout.splitlines() if line.startswith("zerogpu cold call: ")]
    assert len(lines) == len(report["alternatives"])
    for line, figures in zip(lines, report["alternatives"].values()):
        assert line.endswith(f" than {figures['label']}")
        assert (" faster than " in line) == (figures["median"] >= report["cold_call"]["median"])


@pytest.mark.slow
def test_bench_prints_the_table_and_writes_every_figure(env):
    target = env.tmp / "bench.json"
    # Wide enough that no row's label wraps, whatever the output column says.
    result = CliRunner().invoke(app, ["bench", "--size", "16MB", "--repeat", "2", "--json", str(target)],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    report = json.loads(target.read_text())
    check_report(report, repeat=2)
    check_verdicts(result.stdout, report)
    table = result.stdout
    assert "load average" in table and "range" in table
    assert "emulated backend" in table
    for label in ("zerogpu pack", "zerogpu cold call", "zerogpu warm call", *bench.ALTERNATIVES.values()):
        assert label in table
    for strategy in STRATEGIES:
        assert f"copy engine: {strategy}" in table
    assert "zerogpu: cold call 2/2" in result.stderr
    assert not runtime.is_enabled()
    assert list(env.scratch.iterdir()) == []  # the model's files are gone


def test_outputs_are_compared_as_float_sums_can_differ_and_a_corrupt_one_cannot():
    import torch

    from zerogpu.bench.model import compare

    torch.manual_seed(0)
    reference = torch.randn(8, 1024) * 10
    assert compare(reference.clone(), reference) == "identical"
    rounded = reference.clone()
    rounded[0, 0] = 1e-3  # an output near zero, summed in another order: off by much more than itself
    reference[0, 0] = 1e-3 + 3e-5
    assert compare(rounded, reference).startswith("close (max diff 3.0e-05")
    corrupt = reference.clone()
    corrupt[3, 7] += 0.5  # a byte wrong in a weight moves an output by far more than rounding
    assert compare(corrupt, reference).startswith("DIFFERENT")
    assert compare(reference[:4], reference).startswith("DIFFERENT (shape")
    broken = reference.clone()
    broken[1, 1] = float("nan")
    assert compare(broken, reference).startswith("DIFFERENT")


@pytest.mark.slow
def test_bench_as_a_process(env):
    target = env.tmp / "bench.json"
    env.environ["ZEROGPU_IDLE_TIMEOUT"] = "30"  # the cold calls must be cold all the same
    done = run_command([*zerogpu_command(), "bench", "--size", "8MB", "--repeat", "1", "--json", str(target)], env)
    assert done.returncode == 0, done.stderr
    check_report(json.loads(target.read_text()), repeat=1)
    assert "zerogpu bench, emulated backend" in done.stdout
    assert f"figures written to {target}" in done.stderr
    assert list(env.scratch.iterdir()) == []


def fake_statvfs(free: int):
    def statvfs(path):
        return SimpleNamespace(f_bavail=free // 4096, f_frsize=4096, f_blocks=free // 4096)
    return statvfs


@pytest.mark.parametrize("args, patch, message", [
    (["--size", "big"], None, "--size 'big' is not a size: write e.g. 64MB"),
    (["--size", "-5MB"], None, "is not a size"),
    (["--size", "0"], None, "below the smallest model the bench builds, 1MB"),
    (["--size", "512KB"], None, "below the smallest model"),
    (["--size", "64PB"], None, "is not a size"),
    (["--size", "1000TB"], None, "of free memory"),
    (["--size", "64MB"], ("psutil", lambda: SimpleNamespace(available=100 * 2**20, total=2**34)), "of free memory"),
    (["--size", "64MB"], ("statvfs", fake_statvfs(32 * 2**20)), "/dev/shm has 32 MiB free"),
    (["--size", "64MB"], ("disk", lambda path: SimpleNamespace(free=2**20)), "for the model's files"),
    (["--repeat", "0"], None, "--repeat 0 must be a whole number of at least 1"),
    (["--repeat", "-3"], None, "--repeat -3 must be"),
    (["--repeat", "2.5"], None, "--repeat '2.5' is not a whole number"),
    (["--json", "/nonexistent/folder/bench.json"], None, "the folder /nonexistent/folder does not exist"),
    (["--json", "/"], None, "--json /: cannot write a file there"),
])
def test_bad_arguments_exit_with_one_line_before_anything_is_taken(env, monkeypatch, args, patch, message):
    if patch is not None:
        what, fake = patch
        target = {"psutil": (bench_arguments.psutil, "virtual_memory"), "statvfs": (bench_arguments.segments.os, "statvfs"),
                  "disk": (bench_arguments.shutil, "disk_usage")}[what]
        monkeypatch.setattr(*target, fake)
    result = invoke(["bench", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zerogpu bench: ")
    assert message in lines[0]
    assert not runtime.is_enabled()
    assert list(env.scratch.iterdir()) == []


@pytest.mark.slow
def test_bad_arguments_as_a_process(env):
    done = run_command([*zerogpu_command(), "bench", "--size", "lots"], env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "zerogpu bench: --size 'lots' is not a size: write e.g. 64MB, 1GB, 1.5GiB or 4096\n"
    done = run_command([*zerogpu_command(), "bench", "--repeat", "many"], env)
    assert done.returncode == 2
    assert done.stderr == "zerogpu bench: --repeat 'many' is not a whole number: write e.g. --repeat 3\n"


@pytest.mark.parametrize("moment", [
    "zerogpu: packing",
    "zerogpu: cold call 2/",
    "zerogpu: warm call 2/",
    "copy engine: register restore 1/",
    "alternatives: load_file per call 1/",
])
@pytest.mark.slow
def test_ctrl_c_leaves_nothing_behind(env, moment):
    bench_process = subprocess.Popen(
        [*zerogpu_command(), "bench", "--size", "64MB", "--repeat", "20"],
        env=env.environ, cwd=env.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    seen = []
    try:
        while not any(moment in line for line in seen):
            line = bench_process.stderr.readline()
            assert line, f"the bench ended before {moment!r}: {seen}"
            seen.append(line)
        workers = [child.pid for child in psutil.Process(bench_process.pid).children(recursive=True)]
        bench_process.send_signal(signal.SIGINT)
        rest = bench_process.stderr.read()
        assert bench_process.wait(timeout=HANG_GUARD) == 130
    finally:
        bench_process.kill()
        bench_process.wait()
    assert rest.splitlines()[-1] == "zerogpu bench: interrupted; its workers, shared memory and files are gone"
    assert segments_of(bench_process.pid) == []
    assert list(env.scratch.iterdir()) == []
    deadline = time.monotonic() + HANG_GUARD  # a guard against a hang, not a bound on speed
    while any(psutil.pid_exists(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(pid) for pid in workers)


# -- zerogpu run -----------------------------------------------------------------------------


@pytest.mark.parametrize("example, args", [
    ("classify.py", []),
    ("generate.py", ["zero gpu", "12"]),
])
@pytest.mark.slow
def test_examples_give_the_same_output_under_zerogpu_run_as_plainly_on_the_cpu(env, example, args):
    script = str(EXAMPLES / example)
    under_zerogpu = run_command([*zerogpu_command(), "run", script, *args], env)
    plain = run_command([sys.executable, script, *args], env)
    assert under_zerogpu.returncode == 0, under_zerogpu.stderr
    assert plain.returncode == 0, plain.stderr
    assert under_zerogpu.stdout == plain.stdout
    lines = plain.stdout.splitlines()
    if example == "classify.py":
        assert lines[0].startswith("labels: [") and len(lines) == 7
    else:
        assert len(lines) == 12 and all(line.startswith("'zero gpu") for line in lines)
        assert len(eval(lines[-1])) == len("zero gpu") + 12  # the example prints repr()s


@pytest.mark.slow
def test_quickstart_example_runs(env):
    done = run_command([sys.executable, str(EXAMPLES / "quickstart.py")], env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("forward ran in worker ") and lines[0].endswith(": (2, 1024) on cpu")
    assert lines[1:3] == ["same as on the CPU: True", "streamed: [0, 1, 4, 9, 16]"]
    assert len(lines) == 4 and lines[3].startswith("async: ")


PROBE = '''\
import os
import sys

import torch

early = torch.ones(2, device="cuda")  # before `import spaces`: zerogpu is already in place
import spaces
import neighbour


@spaces.GPU(duration=lambda n: 10 + n)
def where(n):
    return os.getpid(), [i * i for i in range(n)]


pid, squares = where(4)
print(__name__, __file__ == os.path.abspath(sys.argv[0]), sys.argv[1:])
print(spaces.__name__, spaces.config.Config.zero_gpu, torch.cuda.is_available(), early.device)
print(pid != os.getpid(), squares, neighbour.VALUE)
'''


def write_probe(folder: Path, body: str = PROBE) -> Path:
    (folder / "neighbour.py").write_text("VALUE = 'found next to the script'\n")
    script = folder / "app.py"
    script.write_text(body)
    return script


@pytest.mark.slow
def test_run_enables_zerogpu_before_the_script_and_passes_its_arguments(env):
    script = write_probe(env.tmp)
    done = run_command([*zerogpu_command(), "run", str(script), "--port", "7860", "-v"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "__main__ True ['--port', '7860', '-v']",
        "zerogpu.integrations.spaces True True cuda:0",
        "True [0, 1, 4, 9] found next to the script",
    ]


def test_run_through_the_test_runner(env, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("spaces", "spaces.config", "spaces.zero", "neighbour"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    script = write_probe(env.tmp)
    result = invoke(["run", str(script), "x"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2] == "True [0, 1, 4, 9] found next to the script"


@pytest.mark.parametrize("body, code, stderr", [
    ("import sys\nsys.exit(3)\n", 3, ""),
    ("import sys\nsys.exit('cannot go on')\n", 1, "cannot go on\n"),
    ("raise SystemExit\n", 0, ""),
    ("print('fine')\n", 0, ""),
])
@pytest.mark.slow
def test_run_passes_exit_codes_through(env, body, code, stderr):
    script = env.tmp / "exits.py"
    script.write_text(body)
    done = run_command([*zerogpu_command(), "run", str(script)], env)
    assert done.returncode == code
    assert done.stderr == stderr


@pytest.mark.slow
def test_run_shows_the_script_traceback_as_python_does(env):
    script = env.tmp / "fails.py"
    script.write_text("def inner():\n    raise ValueError('boom')\n\ninner()\n")
    under_zerogpu = run_command([*zerogpu_command(), "run", str(script)], env)
    plain = run_command([sys.executable, str(script)], env)
    assert under_zerogpu.returncode == plain.returncode == 1
    assert under_zerogpu.stderr == plain.stderr
    assert under_zerogpu.stderr.startswith(f'Traceback (most recent call last):\n  File "{script}", line 4')


@pytest.mark.slow
def test_run_of_an_app_folder_runs_its_main_as_python_does(env):
    app = env.tmp / "app"
    app.mkdir()
    (app / "helper.py").write_text("GREETING = 'hello from the folder'\n")
    (app / "__main__.py").write_text("import helper\nprint(helper.GREETING)\n")
    under_zerogpu = run_command([*zerogpu_command(), "run", str(app)], env)
    plain = run_command([sys.executable, str(app)], env)
    assert under_zerogpu.returncode == plain.returncode == 0, under_zerogpu.stderr
    assert under_zerogpu.stdout == plain.stdout == "hello from the folder\n"


@pytest.mark.slow
def test_run_of_a_missing_script_says_so_as_python_does(env):
    missing = env.tmp / "missing.py"
    done = run_command([*zerogpu_command(), "run", str(missing)], env)
    assert done.returncode == 2
    assert done.stderr == f"zerogpu run: can't open file '{missing}': [Errno 2] No such file or directory\n"


# -- zerogpu info, status, serve ---------------------------------------------------------


def test_info_says_backend_devices_driver_shm_and_build(env):
    result = invoke(["info", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["backend"] == {"name": "emulated", "reason": "ZEROGPU_BACKEND=emulated", "asked": "emulated"}
    assert [device["name"] for device in facts["devices"]] == ["Emulated GPU 0"]
    assert facts["devices"][0]["total_memory"] > 0
    assert isinstance(facts["cuda_driver"]["found"], bool) and facts["cuda_driver"]["library"] == "libcuda.so.1"
    assert 0 < facts["shm"]["free"] <= facts["shm"]["total"]
    assert set(facts["extension"]) == {"compiler", "cxx_standard", "build_type", "nanobind"}
    assert facts["extension"]["cxx_standard"] >= 201703
    text = invoke(["info"])
    assert text.exit_code == 0
    driver = "CUDA driver: libcuda.so.1" if facts["cuda_driver"]["found"] else "no CUDA driver: using the emulated"
    for part in ("backend: emulated", "Emulated GPU 0", driver, "/dev/shm:", "copy engine: built"):
        assert part in text.stdout


def test_info_reports_a_bad_backend_setting(env, monkeypatch):
    monkeypatch.setenv("ZEROGPU_BACKEND", "tpu")
    result = invoke(["info", "--json"])
    assert result.exit_code == 2  # the facts, then the exit code of a bad setting
    facts = json.loads(result.stdout)
    assert facts["backend"]["name"] is None
    assert "ZEROGPU_BACKEND='tpu' is unknown" in facts["backend"]["reason"]
    assert facts["devices"] == []


def test_status_without_a_daemon(env):
    result = invoke(["status"])
    assert result.exit_code == 0, result.output
    assert "no node daemon" in result.stdout and "No leases." in result.stdout
    state = json.loads(invoke(["status", "--json"]).stdout)
    assert state["source"] == "ledger" and state["devices"][0]["name"] == "Emulated GPU 0"


def test_status_of_a_daemon_that_is_not_there_is_one_line(env):
    result = invoke(["status", "--socket", str(env.tmp / "nobody.sock")])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zerogpu status: ")


@pytest.mark.slow
def test_serve_runs_the_daemon_until_ctrl_c(env):
    socket_path = env.tmp / "zerogpu.sock"
    daemon = subprocess.Popen(
        [*zerogpu_command(), "serve", "--socket", str(socket_path), "--quota", "pro=100", "--max-duration",
         "pro=50", "--large-per-gpu", "4", "--heartbeat-timeout", "3"],
        env=env.environ, cwd=env.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert daemon.stdout.readline() == f"ready {socket_path}\n"
        result = invoke(["status", "--socket", str(socket_path), "--json"])
        assert result.exit_code == 0, result.output
        state = json.loads(result.stdout)
        assert state["source"] == "daemon" and state["daemon"]["pid"] == daemon.pid
        assert state["policy"]["daily_quota"]["pro"] == 100
        assert state["policy"]["max_duration"]["pro"] == 50
        assert state["policy"]["large_per_gpu"] == 4
        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=HANG_GUARD) == 0
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
        daemon.stderr.close()


@pytest.mark.parametrize("args, message", [
    (["--quota", "pro"], "--quota 'pro': write TIER=SECONDS"),
    (["--quota", "gold=10"], "unknown tier 'gold'"),
    ([], "name the daemon's socket"),
])
def test_serve_refuses_bad_options_in_one_line(env, args, message):
    result = invoke(["serve", *args])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zerogpu serve: ") and message in lines[0]


def test_help_lists_every_command(env):
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in ("bench", "run", "info", "serve", "status"):
        assert command in result.stdout


@pytest.mark.slow
def test_main_module_runs_the_cli(env):
    done = run_command([sys.executable, "-m", "zerogpu.cli", "info", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backend"]["name"] == "emulated"
    assert done.stderr == ""


# -- the README ------------------------------------------------------------------------------


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith(("#", "set ", "cd ", "apt-get "))]  # system packages: CI's own
    assert " && ".join(steps) in readme
    assert " && ".join([*steps[:2], "pip install torch==2.13.0 && pip install -e . && zerogpu bench"]) in readme


def test_readme_example_is_the_quickstart_example():
    readme = (ROOT / "README.md").read_text()
    shown = readme.rsplit("```python\n", 1)[1].split("```", 1)[0]
    source = (EXAMPLES / "quickstart.py").read_text()
    assert source.endswith(shown)
    assert source[: -len(shown)].rstrip().endswith('"""')  # only the docstring is left out


# -- starting at once ------------------------------------------------------------------------

# Runs the command line's main as the console script does, then says whether torch was imported.
WITHOUT_TORCH = """
import sys
sys.argv = ["zerogpu", *sys.argv[1:]]
try:
    from zerogpu.cli import main
    main()
except SystemExit:
    pass
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.__stderr__)
"""


@pytest.mark.parametrize("args", [
    ["--help"], [], ["nonsense"], ["status"], ["status", "--bogus"], ["info", "--help"], ["info", "--bogus"],
    ["bench", "--help"], ["bench", "--size", "lots"], ["bench", "--repeat", "0"], ["bench", "--size", "1TB"],
    ["bench", "--json", "/nonexistent/folder/bench.json"], ["serve", "--bogus"], ["serve", "--large-per-gpu", "x"],
    ["run"],
], ids=lambda args: " ".join(args) or "no arguments")
def test_help_status_and_argument_errors_answer_without_importing_torch(env, args):
    environ = {**env.environ, "ZEROGPU_SCHEDULER": str(env.tmp / "no-daemon.sock")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], env=environ, capture_output=True,
                          text=True, timeout=HANG_GUARD, cwd=env.tmp)
    assert done.stderr.splitlines()[-1] == "torch imported: False", done.stderr
    assert done.stdout or done.stderr.splitlines()[:-1]  # it answered something
