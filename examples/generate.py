"""A ZeroGPU-style text generator: a small GPT-2 streaming characters from a @spaces.GPU generator.

The model is built from a config (no download) with a character vocabulary,
so its text is noise, but the same noise wherever it runs. The GPU time asked
for grows with the number of characters: a `duration` callable.

    zerogpu run examples/generate.py "zero gpu" 12
    python examples/generate.py "zero gpu" 12
"""

import string
import sys

import torch
import transformers

try:
    import spaces  # on ZeroGPU, and under `zerogpu run`
except ImportError:  # anywhere else: the same API, doing nothing
    from zerogpu.integrations import spaces

VOCABULARY = string.ascii_lowercase + " .,"
device = "cuda" if torch.cuda.is_available() else "cpu"

transformers.logging.set_verbosity_error()
config = transformers.GPT2Config(vocab_size=len(VOCABULARY), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                 initializer_range=0.5)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(config).eval()
model.to(device)


def budget(prompt: str, characters: int = 16) -> float:
    """Seconds of GPU to ask for: a fixed start plus a little per character."""
    return 10 + 0.5 * characters


@spaces.GPU(duration=budget)
def generate(prompt: str, characters: int = 16):
    ids = torch.tensor([[VOCABULARY.index(c) for c in prompt]], device=device)
    with torch.inference_mode():
        for _ in range(characters):
            following = int(model(ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[following]], device=device)], dim=1)
            yield VOCABULARY[following]


if __name__ == "__main__":
    prompt = sys.argv[1] if len(sys.argv) > 1 else "hello"
    characters = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    text = prompt
    for piece in generate(prompt, characters=characters):
        text += piece
        print(repr(text))
