"""A FastAPI app whose endpoints hold a GPU only while they answer.

    zerogpu run examples/fastapi_app.py            # http://127.0.0.1:8000 (PORT to change it)
    curl 'http://127.0.0.1:8000/classify?text=hello'
    curl -N 'http://127.0.0.1:8000/count?n=5'

Each visitor spends their own quota (their address, or the user an
authentication middleware logged in); zerogpu's errors come back as JSON
with their status (429 with Retry-After when a visitor's quota is used up).
"""

import os

import torch
import uvicorn
from fastapi import FastAPI

import zerogpu
from zerogpu.integrations import fastapi as zerogpu_fastapi

zerogpu.enable()  # first, before anything touches CUDA (zerogpu run has done it already)

torch.manual_seed(0)
model = torch.nn.Linear(256, 3).to("cuda")  # recorded here; the weights go to a GPU per call
LABELS = ("negative", "neutral", "positive")


def embed(text: str) -> torch.Tensor:
    codes = torch.zeros(256)
    for byte in text.encode():
        codes[byte] += 1.0
    return codes


@zerogpu.GPU(duration=10)
def classify(text: str) -> str:
    scores = model(embed(text).to("cuda"))
    return LABELS[int(scores.argmax())]


@zerogpu.GPU(duration=30)
def count(n: int):
    for i in range(n):
        yield f"{i}\n"


app = FastAPI()
zerogpu_fastapi.install(app)


@app.get("/classify")
async def classify_endpoint(text: str) -> dict:
    # run() keeps the event loop free, and a client that hangs up cancels the call.
    return {"text": text, "label": await zerogpu_fastapi.run(classify, text)}


@app.get("/count")
def count_endpoint(n: int = 5):
    return zerogpu_fastapi.stream(count, n)


if __name__ == "__main__":
    zerogpu.startup()  # pack the weights before the first visitor
    # proxy_headers=False: ZEROGPU_TRUSTED_PROXIES, not uvicorn, decides which forwarding headers count.
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")),
                proxy_headers=False)
