"""Logged-in visitors of a Gradio app (launch(auth=...)) each spend their own quota; launch() packs the weights.

One app (apps/gradio_behaviours.py with GRADIO_AUTH) serves the module;
alice and bob log in as gradio_client does. The README's Gradio Space
example runs here too.
"""

from __future__ import annotations

import pytest
import torch
from gradio_client import Client

from gradio_server import APPS, ROOT, GradioServer, free_port

pytestmark = pytest.mark.allow_leaks  # the apps serve every test; their fixtures check leaks when they stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = GradioServer(APPS / "gradio_behaviours.py", tmp_path_factory.mktemp("gradio"), env={
        "GRADIO_AUTH": "alice:wonderland,bob:builder",
        "ZEROGPU_QUOTA": "free=20",
    })
    app.start()
    try:
        yield app
    finally:
        app.stop()


def test_two_logged_in_visitors_have_separate_quotas(server):
    alice = Client(server.url, auth=("alice", "wonderland"), verbose=False)
    bob = Client(server.url, auth=("bob", "builder"), verbose=False)
    # 20 s a day each (free tier); a call asks for 19.5, so after one has run the next one does not fit.
    assert alice.predict(0.8, api_name="/spend") == "spent"
    with pytest.raises(Exception, match=r"Try again in \d+:\d\d:\d\d"):
        alice.predict(0.8, api_name="/spend")
    assert bob.predict(0.8, api_name="/spend") == "spent"


@pytest.mark.slow  # transformers
def test_the_gradio_space_example_answers(tmp_path):
    app = GradioServer(ROOT / "examples" / "gradio_space.py", tmp_path)
    app.start()
    try:
        label = Client(app.url, verbose=False).predict("a fine day", api_name="/classify")
    finally:
        app.stop()
    assert {c["label"] for c in label["confidences"]} == {"negative", "positive"}


def test_launch_packs_the_weights_before_the_first_call(gpu):
    import gradio as gr

    from zerogpu import runtime
    from zerogpu.integrations import gradio as zerogpu_gradio

    zerogpu_gradio.install()
    model = torch.nn.Linear(64, 64).to("cuda")
    demo = gr.Interface(lambda x: x, "text", "text")
    assert runtime.models() == []
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        assert sum(m.nbytes for m in runtime.models()) >= model.weight.numel() * 4
    finally:
        demo.close()


def test_the_timeout_grace_is_at_most_a_second_by_default(monkeypatch):
    from zerogpu import settings

    monkeypatch.delenv("ZEROGPU_TIMEOUT_GRACE", raising=False)
    assert settings.timeout_grace() <= 1.0
