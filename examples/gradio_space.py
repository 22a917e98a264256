"""A Gradio Space written for Hugging Face's ZeroGPU, unchanged: run it with `zerogpu run examples/gradio_space.py`.

A small text classifier (a BERT built from its config, random weights, so
nothing is downloaded) is moved to 'cuda' at import; `launch()` packs it
before the first visitor comes. Each click runs `classify` in a worker that
holds a GPU for the call only, charged to that visitor's daily quota, with
its progress shown in the page.
"""

import gradio as gr
import spaces
import torch
from transformers import BertConfig, BertForSequenceClassification

LABELS = ["negative", "positive"]
config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=len(LABELS))
torch.manual_seed(0)
model = BertForSequenceClassification(config).eval().to("cuda")


@spaces.GPU(duration=20)
def classify(text: str, progress=gr.Progress()) -> dict[str, float]:
    progress(0, desc="reading")
    ids = torch.tensor([[min(ord(c), 255) for c in text[:128]] or [0]], device="cuda")
    with torch.no_grad():
        scores = model(input_ids=ids).logits.softmax(-1)[0]
    progress(1, desc="done")
    return {label: float(score) for label, score in zip(LABELS, scores)}


demo = gr.Interface(classify, gr.Textbox(label="Text"), gr.Label(label="Sentiment"),
                    title="zerogpu: a ZeroGPU Space on your own GPUs")

if __name__ == "__main__":
    demo.launch()
