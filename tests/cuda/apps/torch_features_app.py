"""A small app written the way public ZeroGPU Spaces are: it runs plainly on the CPU and under `zerogpu run`.

It prints one JSON line of what it computed; the test compares the two runs.
"""

import json
import sys
import tempfile

import spaces  # under zerogpu run: zerogpu's; plainly: the stub the test puts on the path
import torch
import transformers
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

# from_pretrained(..., device_map="auto") at import, on a tiny model saved from a config.
folder = tempfile.mkdtemp()
config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                 bos_token_id=0, eos_token_id=0)
transformers.GPT2LMHeadModel(config).save_pretrained(folder)
language_model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="auto" if DEVICE == "cuda" else None)

# pipe.enable_model_cpu_offload() at import, on a tiny diffusion pipeline.
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)
pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
if DEVICE == "cuda":
    pipe.enable_model_cpu_offload()


@spaces.GPU(duration=60, queue=False)
def generate(seed):
    ids = torch.arange(8, device=DEVICE).unsqueeze(0)
    logits = language_model(ids).logits
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    image = pipe(generator=generator, num_inference_steps=2, output_type="np").images
    noise = torch.randn(4, generator=torch.Generator(device=DEVICE).manual_seed(seed), device=DEVICE)
    operands = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    a, b = (torch.randn(8, 8, generator=operands, device=DEVICE) for _ in range(2))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        product = a @ b
    return {
        "device": language_model.device.type,
        "logits": logits[0, -1, :4].tolist(),
        "image": image.reshape(-1)[:6].tolist(),
        "noise": noise.tolist(),
        "autocast": [str(product.dtype), product.float().sum().item()],
    }


print(json.dumps([generate(int(sys.argv[1])), generate(int(sys.argv[1]))]))
