"""An app that compiles its transformer ahead of time the way ZeroGPU's AoT guide does, or loads it from disk.

argv[1]: the package folder. The first run compiles and saves there; a later run loads it. Prints one JSON line.
"""

import json
import sys
from pathlib import Path

import psutil
import spaces
import torch
import transformers

import zerogpu.aot

PACKAGE = Path(sys.argv[1])
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=16384, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=256, max_position_embeddings=64)
model = transformers.BertModel(config).eval().to("cuda")
weights = sum(tensor.nbytes for tensor in model.state_dict().values())
ids = torch.arange(16, device="cuda").unsqueeze(0) * 7


@spaces.GPU
def run():
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.cpu()


eager = run()
process = psutil.Process()
compiled_now = not PACKAGE.exists()
if compiled_now:
    @spaces.GPU(duration=1500)
    def compile_model():
        with spaces.aoti_capture(model) as call:
            model(input_ids=ids)
        exported = torch.export.export(model, args=call.args, kwargs=call.kwargs)
        return spaces.aoti_compile(exported)

    before = process.memory_info().rss
    compiled = compile_model()
    grown = process.memory_info().rss - before
    spaces.aoti_apply(compiled, model)
    zerogpu.aot.save(compiled, PACKAGE / "root")
else:
    grown = 0
    spaces.aoti_load_from_package_dir(model, PACKAGE)

outputs = [run(), run()]  # two cold workers, each loading the package once
print(json.dumps({
    "compiled": compiled_now,
    "bound": type(model.forward).__name__,
    "difference": max((output - eager).abs().max().item() for output in outputs),
    "rss_growth": grown,
    "weights": weights,
}))
