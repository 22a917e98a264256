"""What compiling costs and saves on the emulated backend: eager against AoT against torch.compile.

    python benchmarks/bench_compile.py [--repeat 3] [--json PATH]

A small BERT (transformers, from a config, random weights) runs in cold
workers three ways in one run: eager; torch.compile inside the GPU function
(its first cold call compiles into the app's cache, its second starts from
that cache); and ahead-of-time (zerogpu.aot.compile in a worker, then each
cold worker loads the package without weights and binds its restored
weights). Times are of whole cold calls as the caller sees them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from rich.table import Table

from report import command_line, console, machine, median, write_figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="cold calls measured for each way after the first")
    parser.add_argument("--json", help="write every figure to this file")
    arguments = parser.parse_args(argv)
    data = tempfile.mkdtemp(prefix="zerogpu-bench-compile-")
    os.environ.update(ZEROGPU_BACKEND="emulated", ZEROGPU_DATA_DIR=data, ZEROGPU_QUOTA="anonymous=1e9",
                      ZEROGPU_IDLE_TIMEOUT="0")
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # a cold compile cache of this run's own
    import torch
    import transformers

    import zerogpu
    import zerogpu.aot

    zerogpu.enable()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16384, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=64)
    model = transformers.BertModel(config).eval().to("cuda")
    ids = torch.arange(32, device="cuda").unsqueeze(0) * 7

    @zerogpu.GPU(duration=1500)
    def eager():
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.cpu()

    @zerogpu.GPU(duration=1500)
    def compiled():
        with torch.no_grad():
            return torch.compile(model)(input_ids=ids).last_hidden_state.cpu()

    def cold(call) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        result = call()
        return time.perf_counter() - start, result

    figures: dict = {}
    first, reference = cold(eager)
    figures["eager"] = {"first": first, "later": [cold(eager)[0] for _ in range(arguments.repeat)]}
    first, out = cold(compiled)
    assert torch.allclose(out, reference, atol=1e-4)
    figures["torch.compile"] = {"first": first, "later": [cold(compiled)[0] for _ in range(arguments.repeat)]}
    start = time.perf_counter()
    package = zerogpu.aot.compile(model, (), {"input_ids": ids})
    compile_seconds = time.perf_counter() - start
    zerogpu.aot.apply(package, model)
    first, out = cold(eager)
    assert torch.allclose(out, reference, atol=1e-4)
    figures["AoT"] = {"compile": compile_seconds, "first": first,
                      "later": [cold(eager)[0] for _ in range(arguments.repeat)], "package_bytes": len(package.archive)}

    table = Table(title="cold calls of a 2-layer BERT on the emulated backend (seconds)")
    for column in ("way", "compile (worker)", "first cold call", "later cold calls (median)", "x eager"):
        table.add_column(column, justify="left" if column == "way" else "right")
    eager_later = median(figures["eager"]["later"])
    for way, values in figures.items():
        later = median(values["later"])
        compile_text = f"{values['compile']:.1f}" if "compile" in values else ("in the first call" if way == "torch.compile" else "-")
        table.add_row(way, compile_text, f"{values['first']:.2f}", f"{later:.2f}", f"{later / eager_later:.2f}")
    out = console()
    out.print(table)
    out.print(f"AoT package without weights: {figures['AoT']['package_bytes'] / 2**20:.1f} MiB; "
              f"weights: {sum(t.nbytes for t in model.state_dict().values()) / 2**20:.1f} MiB")
    if arguments.json:
        write_figures(arguments.json, {"machine": machine(), "command": command_line(argv), "figures": figures}, out)


if __name__ == "__main__":
    sys.exit(main())
