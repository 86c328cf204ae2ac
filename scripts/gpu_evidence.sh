#!/usr/bin/env bash
# Issue 25's GPU evidence in one command, on a lent GPU machine (the device tool), which reaches no network.
# Here first:   python scripts/prepare_gpu_carry.py          (fills the git-ignored .gpu/: wheels, tokenizer)
# Then:         device run  command="bash scripts/gpu_evidence.sh"  carry=[".gpu"]  timeout_s=590
# It installs the carried wheels beside the image's torch and transformers, prints the versions and the
# GPU, and runs benchmarks/bench_real_size.py on LLaMA-3-8B and Qwen2.5-7B (random weights, bfloat16).
# Results: $OUT/real_size.json and $OUT/real_size.log (both also printed). BENCH_ARGS adds options; DEVICE=cpu
# (with BENCH_ARGS="--scale tiny ...") rehearses it on a machine without a GPU (tests/test_real_size_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-evidence}
mkdir -p "$OUT"
[ -d .gpu/whl ] || { echo "no .gpu/whl: run python scripts/prepare_gpu_carry.py here and carry .gpu" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:=/tmp/site}" .gpu/whl/*.whl \
    || exit 3
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DEVICE=${DEVICE:-cuda}
: > "$OUT/gpu.txt"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformer_lens; from importlib.metadata import version; print('python', \
sys.version.split()[0], '| torch', torch.__version__, '|', ', '.join(f'{name} {version(name)}' for name in \
('transformers', 'transformer-lens', 'numpy')))" | tee -a "$OUT/gpu.txt" || exit 4
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/bench_real_size.py --device "$DEVICE" --tokenizer .gpu/tokenizer \
    --json "$OUT/real_size.json" ${BENCH_ARGS:-} 2>&1 | grep -v "DEPRECATED\|Please update\|Since TransformerLens\|aliases may be" \
    | tee "$OUT/real_size.log"
