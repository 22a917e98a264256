"""A Gradio app written for ZeroGPU, under `zerogpu run`, as its visitors see it through gradio_client.

One app (apps/gradio_behaviours.py) serves the module, on one emulated GPU,
with Gradio's default show_error=False. Each test comes as its own visitor:
its own address, which the app learns from X-Forwarded-For because the
connection comes from 127.0.0.1, a trusted proxy (ZEROGPU_TRUSTED_PROXIES).
"""

from __future__ import annotations

import itertools
import re

import pytest
from gradio_client import Client

from gradio_server import APPS, GradioServer, logs, progress, shown, updates

pytestmark = pytest.mark.allow_leaks  # the app serves every test; `server` checks leaks when it stops

QUEUE_TIMEOUT = 5
_addresses = (f"10.0.{n // 250}.{n % 250 + 1}" for n in itertools.count())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = GradioServer(APPS / "gradio_behaviours.py", tmp_path_factory.mktemp("gradio"), env={
        "ZEROGPU_QUOTA": "anonymous=20",
        "ZEROGPU_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT),
        "ZEROGPU_TRUSTED_PROXIES": "127.0.0.1",
    })
    app.start()
    try:
        yield app
    finally:
        app.stop()


def visitor(server: GradioServer, address: str | None = None) -> Client:
    """A visitor from its own address, through the trusted proxy."""
    return Client(server.url, headers={"X-Forwarded-For": address or next(_addresses)}, verbose=False)


def error_of(job) -> str:
    with pytest.raises(Exception) as raised:
        job.result()
    return str(raised.value)


def test_a_gpu_function_returns_its_value(server):
    assert visitor(server).predict(3, api_name="/double") == "6.0"


def test_progress_and_toasts_from_the_worker_reach_the_visitor_in_order(server):
    job = visitor(server).submit(4, api_name="/steps")
    collected = updates(job)
    assert job.result() == "4"
    # The toasts, in the order the function showed them, between the bar's steps.
    assert logs(collected) == [("starting", "info"), ("halfway", "warning"), ("finished", "info")]
    steps = progress(collected)
    assert steps[0] == ("stepping", 0, 4)
    assert [index for _, index, _ in steps] == sorted(index for _, index, _ in steps)
    # Gradio sends the bar on its own clock (a step may be skipped, the last overtaken by the
    # result) but each toast at once: every bar seen before a toast is at or before the step the
    # function showed it at, and every bar seen after it at or past that step.
    events = [("log", u.log[0]) if getattr(u, "log", None) else ("bar", u.progress_data[-1].index)
              for u in collected if getattr(u, "log", None) or getattr(u, "progress_data", None)]
    for toast, step in [("halfway", 1), ("finished", 4)]:
        at = events.index(("log", toast))
        assert all(index <= step for kind, index in events[:at] if kind == "bar"), events
        assert all(index >= step for kind, index in events[at:] if kind == "bar"), events


def test_tqdm_tracked_by_gr_progress_reaches_the_visitor(server):
    job = visitor(server).submit(4, api_name="/tracked")
    collected = updates(job)
    assert job.result() == "6"
    steps = progress(collected)
    assert steps[0] == ("tracking", 0, 4)
    # Gradio sends a job's progress on its own clock, so the last step may be overtaken by the
    # result; every step seen is tqdm's, in order, and the bar moved while the call ran.
    assert all(step[0] == "tracking" and step[2] == 4 for step in steps)
    assert [step[1] for step in steps] == sorted(step[1] for step in steps)
    assert steps[-1][1] > 0


def test_a_generator_streams_its_values(server):
    job = visitor(server).submit(3, api_name="/stream")
    updates(job)
    assert job.outputs() == ["part 0", "part 1", "part 2"]


def test_a_call_past_its_duration_is_warned_then_aborted(server):
    job = visitor(server).submit(30, api_name="/overrun")
    collected = updates(job)
    assert error_of(job) == "GPU task aborted"
    assert ("GPU task is exceeding its requested duration and might be aborted", "warning") in logs(collected)
    # The server's log says why, naming the decorator the app's author wrote.
    assert "ask for more time with @spaces.GPU(duration=...)" in server.log()


def test_a_worker_that_dies_is_a_gpu_task_aborted(server):
    assert error_of(visitor(server).submit("x", api_name="/crash")) == "GPU task aborted"
    assert "killed by SIGKILL" in server.log()


def test_any_other_exception_shows_only_its_class(server):
    message = error_of(visitor(server).submit("x", api_name="/fail"))
    assert message == "ValueError"
    # The message and the worker's traceback go to the server's log, not to the visitor.
    log = server.log()
    assert "ValueError: a secret the visitor must not see" in log
    assert 'raise ValueError("a secret the visitor must not see")' in log


def test_a_gr_error_of_the_function_passes_through_as_it_is(server):
    client = visitor(server)
    job = client.submit("x", api_name="/refuse")
    updates(job)
    assert error_of(job) == "the app's own words"


def test_two_addresses_through_a_trusted_proxy_have_separate_quotas(server):
    # 20 s a day each; a call asks for 19.5, so after one has run the next one does not fit.
    first, second = visitor(server, "10.9.0.1"), visitor(server, "10.9.0.2")
    assert first.predict(0.8, api_name="/spend") == "spent"
    refused = error_of(first.submit(0.8, api_name="/spend"))
    assert re.search(r"Try again in \d+:\d\d:\d\d", refused), refused
    assert second.predict(0.8, api_name="/spend") == "spent"


@pytest.mark.slow
def test_a_call_that_waits_for_a_gpu_says_so_and_when_it_got_one(server, tmp_path):
    release = tmp_path / "release"
    holder = visitor(server).submit(str(release), api_name="/hold")
    updates(holder, until=shown("holding"))
    waiting = visitor(server).submit("x", api_name="/quick")
    try:
        seen = updates(waiting, until=shown("Waiting for a GPU to become available"))
    finally:
        release.touch()
    collected = seen + updates(waiting)
    assert waiting.result() == "quick"
    assert logs(collected)[-2:] == [("Waiting for a GPU to become available", "info"),
                                    ("Successfully acquired a GPU", "success")]
    assert holder.result() == "held"


@pytest.mark.slow
def test_no_gpu_within_the_queue_timeout_says_how_long_it_waited(server, tmp_path):
    release = tmp_path / "release"
    holder = visitor(server).submit(str(release), api_name="/hold")
    try:
        updates(holder, until=shown("holding"))
        message = error_of(visitor(server).submit("x", api_name="/quick"))
    finally:
        release.touch()
    assert message == f"No GPU was available after {QUEUE_TIMEOUT} s"
    assert holder.result() == "held"
