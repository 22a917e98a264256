#!/usr/bin/env bash
# The whole GPU run in one command: build the copy engine, run the gpu tests, then every
# GPU figure (restore strategies against a pinned cuMemcpyHtoD at 1, 4 and 16 GB, pinning
# and registration per GB, CUDA context creation, the cold call by phase, zerogpu bench),
# written to one JSON file and one Markdown section for benchmarks/RESULTS.md.
#
#   benchmarks/gpu.sh [--dry-run]          figures go to $OUT (or benchmarks/gpu-run)
#
# Sized to end inside 8 minutes on an H100 or H200. It installs nothing from the network:
# wheels it needs (nanobind, scikit-build-core and zerogpu's own dependencies missing
# there) come from $ZEROGPU_WHEELS (default .gpu-wheels/, carried with the tree).
# --dry-run (or ZEROGPU_GPU_SH_DRY_RUN=1) runs every step on the emulated backend with
# tiny sizes and no build, so the test suite can run it and it cannot rot.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dry=${ZEROGPU_GPU_SH_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-$root/benchmarks/gpu-run}
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
started=$(date +%s)
step() { echo "== $(( $(date +%s) - started )) s: $*" >&2; }

if [ "$dry" = 1 ]; then
  export ZEROGPU_BACKEND=emulated
  backend=emulated restore_sizes=4MB pin_sizes=4MB model=2MB bench_size=2MB repeat=1 call_repeat=1 threads=1
  tests=(--collect-only -q "$root/tests/cuda/test_engine.py")
else
  backend=cuda restore_sizes=1GB,4GB,16GB pin_sizes=256MB,1GB,4GB model=64MB bench_size=1GB repeat=3 call_repeat=9
  threads=1,4
  tests=(-q -x "$root/tests")
  wheels=${ZEROGPU_WHEELS:-$root/.gpu-wheels}
  if [ -d "$wheels" ]; then
    step "installing the carried wheels from $wheels"
    "$python" -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl
  fi
  step "building the copy engine"
  build=$(mktemp -d)
  cmake -S "$root" -B "$build" -DSKBUILD=ON -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$python")" \
    -Dnanobind_DIR="$("$python" -m nanobind --cmake_dir)" >/dev/null
  cmake --build "$build" -j"$(nproc)" --target _engine >/dev/null
  cp "$build"/_engine*.so "$root/zerogpu/cuda/_ext/"
fi

cd "$root/benchmarks"
step "the gpu tests"
"$python" -m pytest -p no:cacheprovider -m gpu "${tests[@]}" | tee "$out/gpu-tests.txt" >&2
step "restore strategies against a pinned cuMemcpyHtoD: $restore_sizes"
"$python" bench_restore.py --backend "$backend" --sizes "$restore_sizes" --repeat "$repeat" --threads "$threads" \
  --json "$out/restore.json" >&2
step "pinning and registration per GB, context creation"
"$python" bench_pinning.py --backend "$backend" --sizes "$pin_sizes" --repeat "$repeat" --json "$out/pinning.json" >&2
step "the cold call by phase"
"$python" bench_call.py --repeat "$call_repeat" --model-size "$model" --fork-sizes "$model" \
  --json "$out/call.json" >&2
step "zerogpu bench"
"$python" -m zerogpu.cli bench --size "$bench_size" --repeat "$repeat" --json "$out/bench.json" >&2
step "writing $out/gpu.json and $out/gpu.md"
"$python" gpu_report.py "$out" "$(( $(date +%s) - started ))"
