#!/usr/bin/env bash
# One prepared GPU run (issue 16): the `gpu` tests, then driver.py (roofline, kernel micro-benchmarks, HF transformers
# generate(), kimi_k2 engine decode at 1/8/64/256 streams). Offline; about 8 minutes at most on one H200.
#   benchmarks/gpu/run.sh                 results in benchmarks/gpu/results/ (override with OUT_DIR=...)
#   benchmarks/gpu/run.sh --dry-run       the same on the CPU at toy sizes (kernels under TRITON_INTERPRET=1)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-benchmarks/gpu/results}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
    | tee "$OUT_DIR/gpu-$stamp.txt"
# 1. correctness on this GPU first (Triton kernels compiled for it, cuBLAS block-scaled FP8); at most 150 s
if [[ " $* " != *" --dry-run "* ]]; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT_DIR/gpu-tests-$stamp.txt" \
        || echo "gpu tests failed or timed out: see $OUT_DIR/gpu-tests-$stamp.txt"
fi
# 2. the benchmarks; the driver skips what its own budget cannot fit and always writes the JSON
timeout 320 "$PY" benchmarks/gpu/driver.py --budget-s 280 --out "$OUT_DIR/results-$stamp.json" "$@" \
    | tee "$OUT_DIR/results-$stamp.md"
