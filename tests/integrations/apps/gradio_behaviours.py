"""A Gradio app written for ZeroGPU, with one event per behaviour the Gradio tests look at.

Run under `zerogpu run`; GRADIO_SERVER_PORT gives the port, GRADIO_AUTH
("user:password,user:password") turns on Gradio's login.
"""

import os
import signal
import time

import gradio as gr
import spaces
import torch
from tqdm import tqdm

model = torch.nn.Linear(4, 2).to("cuda")


@spaces.GPU(duration=5)
def double(x):
    return float(model(torch.ones(4, device="cuda")).sum() * 0 + 2 * x)


@spaces.GPU(duration=5)
def steps(n, progress=gr.Progress()):
    gr.Info("starting")
    for i in progress.tqdm(range(int(n)), desc="stepping"):
        time.sleep(0.05)
        if i == 1:
            gr.Warning("halfway")
    gr.Info("finished")
    return int(n)


@spaces.GPU(duration=5)
def tracked(n, progress=gr.Progress(track_tqdm=True)):
    total = 0
    for i in tqdm(range(int(n)), desc="tracking"):
        time.sleep(0.05)
        total += i
    return total


@spaces.GPU(duration=1)
def overrun(seconds):
    time.sleep(seconds)
    return "never"


@spaces.GPU(duration=5)
def crash(_):
    os.kill(os.getpid(), signal.SIGKILL)


@spaces.GPU(duration=5)
def fail(_):
    raise ValueError("a secret the visitor must not see")


@spaces.GPU(duration=5)
def refuse(_):
    raise gr.Error("the app's own words", title="App")


@spaces.GPU(duration=19.5)
def spend(seconds):
    time.sleep(seconds)
    return "spent"


@spaces.GPU(duration=8, size="xlarge")
def hold(path):
    # Holds the one GPU until the test creates `path`.
    gr.Info("holding")
    deadline = time.monotonic() + 7
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "held"


@spaces.GPU(duration=2, size="xlarge")
def quick(_):
    return "quick"


@spaces.GPU(duration=5)
def stream(n):
    for i in range(int(n)):
        yield f"part {i}"


with gr.Blocks() as demo:
    number = gr.Number()
    text = gr.Textbox()
    out = gr.Textbox()
    for fn, source in [(double, number), (steps, number), (tracked, number), (overrun, number), (crash, text),
                       (fail, text), (refuse, text), (spend, number), (hold, text), (quick, text),
                       (stream, number)]:
        gr.Button(fn.__name__).click(fn, source, out, api_name=fn.__name__)

auth = [tuple(pair.split(":")) for pair in os.environ.get("GRADIO_AUTH", "").split(",") if pair]
demo.queue(default_concurrency_limit=None).launch(auth=auth or None, show_error=False)
