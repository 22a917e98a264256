"""A ZeroGPU-style app: a small classifier moved to the GPU at import, used in @spaces.GPU functions.

    zerogpu run examples/classify.py     # on this machine's GPUs (emulated when it has none)
    python examples/classify.py          # plainly, on the CPU: the same output
"""

from datetime import timedelta

import torch

try:
    import spaces  # on ZeroGPU, and under `zerogpu run`
except ImportError:  # anywhere else: the same API, doing nothing
    from zerogpu.integrations import spaces

LABELS = ["cat", "dog", "bird", "fish"]
device = "cuda" if torch.cuda.is_available() else "cpu"

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
model.to(device)


@spaces.GPU
def classify(features: torch.Tensor) -> list[str]:
    with torch.inference_mode():
        scores = model(features.to(device))
    return [LABELS[i] for i in scores.argmax(dim=1).tolist()]


@spaces.GPU(duration=timedelta(seconds=20))
def probabilities(features: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(features.to(device)).softmax(dim=1).cpu()


if __name__ == "__main__":
    features = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    print("labels:", classify(features))
    for row in probabilities(features).tolist():
        print(row)
