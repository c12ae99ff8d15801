#!/usr/bin/env bash
# A short GPU check for a lent machine (a few minutes on an H100), run once from the repository root:
#   1. the environment and the CUDA-capable tests
#   2. a CUDA predict through ./run.sh on two phantom cases, outputs checked by evaluate
#   3. the benchmark: width 32 (the paper's) ten folds fast, one grid and shifted, one fold paper; the shipped
#      ensemble fast vs paper (agreement with real weights), bf16 and fp32
# Tables and logs go to $OUT. DEVICE=cpu BENCH=shipped-fast-1 gives a dry run on a CPU.
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/omnet_gpu}"; mkdir -p "$WORK"
DEVICE="${DEVICE:-cuda}"
BENCH="${BENCH:-w32-fast-all,w32-fastfixed-all,w32-paper-1,shipped-fast-all,shipped-paper-all,shipped-fast-all-fp32}"
source "$(dirname "$0")/gpu_env.sh"

log "tests that exercise the model and tiling"
python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_fusion_postprocess.py 2>&1 | tail -2

log "$DEVICE predict through ./run.sh"
python3 -m app phantoms --out "$WORK/in" --n 2 --seed 7
./run.sh --input "$WORK/in" --output "$WORK/out" --device "$DEVICE" --quiet --report "$OUT/predict_report.json"
echo "predict exit status $?"
python3 -m app evaluate --pred "$WORK/out" --gt "$WORK/in" | tail -n 3

log "benchmark"
python3 benchmarks/benchmark.py --device "$DEVICE" --configs "$BENCH" --workdir "$WORK/bench" 2>&1 | tee "$OUT/benchmark.md"
log "done"
