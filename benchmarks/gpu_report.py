"""Gathers the figures of one benchmarks/gpu.sh run into gpu.json and a Markdown section, gpu.md.

    python benchmarks/gpu_report.py FOLDER SECONDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PARTS = ("restore", "pinning", "call", "bench")


def markdown(figures: dict, seconds: int) -> str:
    bench = figures["bench"]
    lines = [f"## GPU run ({bench['date'][:10]}, {bench['backend']} backend, {bench['device']})", "",
             f"`benchmarks/gpu.sh` in {seconds} s; load average {figures['call']['machine']['load_average']}.", "",
             "| restore | size | threads | GB/s | / limit | bit-exact |", "| --- | --- | --- | --- | --- | --- |"]
    for row in figures["restore"]["results"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['name']} | {row['size'] / 2**30:g} GiB | {row['threads'] or ''} | {row['gbps']:.2f} "
                     f"| {ratio} | {'' if row['bit_exact'] is None else row['bit_exact']} |")
    lines += ["", "| pinning | s per GB |", "| --- | --- |"]
    for row in figures["pinning"]["pinning"]:
        lines.append(f"| cuMemHostAlloc {row['bytes'] / 2**20:.0f} MiB | {row['host_alloc_s_per_gb']:.3f} |")
        lines.append(f"| cuMemHostRegister {row['bytes'] / 2**20:.0f} MiB | {row['register_s_per_gb']:.3f} |")
    lines += ["", f"Context creation: {figures['pinning']['context_median_s'] * 1e3:.1f} ms.", "",
              "| cold call phase | ms |", "| --- | --- |"]
    for phase, ms in figures["call"]["overhead"]["cold_phases_ms"].items():
        lines.append(f"| {phase} | {ms:.2f} |")
    lines += ["", "| zerogpu bench row | median s | range s |", "| --- | --- | --- |"]
    for label, row in (("cold call", bench["cold_call"]), ("warm call", bench["warm_call"]),
                       *((figures_["label"], figures_) for figures_ in bench["alternatives"].values())):
        lines.append(f"| {label} | {row['median']:.4f} | {row.get('min', 0):.4f}-{row.get('max', 0):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    folder, seconds = Path(argv[0]), int(argv[1])
    figures = {part: json.loads((folder / f"{part}.json").read_text()) for part in PARTS}
    figures["seconds"] = seconds
    (folder / "gpu.json").write_text(json.dumps(figures, indent=2) + "\n")
    (folder / "gpu.md").write_text(markdown(figures, seconds))
    print(f"figures written to {folder / 'gpu.json'} and {folder / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
