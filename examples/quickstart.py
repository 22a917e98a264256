"""zerogpu in a few lines: weights moved to 'cuda' once, functions that hold a GPU only while they run.

    python examples/quickstart.py

Without a GPU zerogpu emulates one on the CPU, so this runs anywhere.
"""

import asyncio
import os

import torch

import zerogpu

zerogpu.enable()  # first, before anything touches CUDA (or set ZEROGPU=1 in the environment)

torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024).to("cuda")  # recorded here; the weights go to a GPU per call
zerogpu.startup()  # pack the weights into shared memory now rather than on the first call


@zerogpu.GPU(duration=30)
def forward(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    return os.getpid(), model(x.to("cuda")).cpu()


@zerogpu.GPU
def squares(n: int):
    for i in range(n):
        yield i * i


@zerogpu.GPU(duration=10)
async def total(x: torch.Tensor) -> float:
    return model(x.to("cuda")).sum().item()


if __name__ == "__main__":
    x = torch.ones(2, 1024)
    pid, y = forward(x)
    print(f"forward ran in worker {pid}, not here ({os.getpid()}): {tuple(y.shape)} on {y.device}")
    print("same as on the CPU:", torch.allclose(y, torch.nn.functional.linear(x, model.weight.cpu(), model.bias.cpu())))
    print("streamed:", list(squares(5)))
    with zerogpu.identity("alice", tier="pro"):  # charged to alice's daily quota
        print("async:", round(asyncio.run(total(x)), 3))
