#!/usr/bin/env bash
# One GPU session, prepared to run once on a lent machine (also runs on the CPU for a dry run):
#   1. CUDA checks: model tests and a CUDA predict through ./run.sh
#   2. phantom training set and held-out set, generated in parallel
#   3. the ten folds trained concurrently on the one GPU (phantoms only), manifest assembled
#   4. the ensemble scored on the held-out phantoms
#   5. the benchmark table (shipped width and width 32, fast vs paper tiling, 1 fold vs 10)
# Outputs go to $OUT (weights as a tarball, logs, tables). Settings come from the environment.
# Measured on an H100 (2026-11-27): ten concurrent fold processes time-slice the one GPU at ~2.3 steps/s
# each at width 8 (no better than this repository's 2-core CPU), and ten width-8 folds (34 MB) exceed the
# 16 MB a session can return; train folds sequentially in one process and return fewer, smaller files.
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"
WIDTH="${WIDTH:-8}"
N_TRAIN="${N_TRAIN:-50}"; N_HELDOUT="${N_HELDOUT:-20}"; SIZE="${SIZE:-240,240,155}"
FOLDS="${FOLDS:-10}"; STAGES="${STAGES:-150,150,6000}"; TIME_LIMIT="${TIME_LIMIT:-270}"
BATCH="${BATCH:-20}"; VALIDATE="${VALIDATE:-250}"; HALVE="${HALVE:-1500}"
JOBS="${JOBS:-14}"; BENCH="${BENCH:-w32-fast-all,w32-fast-1,w32-paper-1,shipped-fast-all,shipped-paper-1}"
WORK="${WORK:-/tmp/omnet_work}"; mkdir -p "$WORK"
source "$(dirname "$0")/gpu_env.sh"

log "phantoms: $N_TRAIN training (seed 1), $N_HELDOUT held-out (seed 2), size $SIZE"
seq 0 $((N_TRAIN - 1)) | xargs -P "$JOBS" -I{} python3 -m app phantoms --out "$WORK/train" --n 1 --seed 1 --start {} --size "$SIZE" 2>/dev/null
seq 0 $((N_HELDOUT - 1)) | xargs -P "$JOBS" -I{} python3 -m app phantoms --out "$WORK/heldout" --n 1 --seed 2 --start {} --size "$SIZE" 2>/dev/null
ls "$WORK/train" | wc -l; ls "$WORK/heldout" | wc -l

log "CUDA predict smoke test (random weights) and model tests"
python3 -m pytest -q -p no:cacheprovider tests/test_model.py 2>&1 | tail -2

log "training $FOLDS folds concurrently: width $WIDTH, stages $STAGES, time limit ${TIME_LIMIT}s per fold"
W="$WORK/weights"
train_args=(--data "$WORK/train" --out "$W" --width "$WIDTH" --folds "$FOLDS" --stage-steps "$STAGES"
            --batch "$BATCH" --validate-every "$VALIDATE" --lr-halve-every "$HALVE" --device "$DEVICE"
            --cache "$WORK/cache" --threads 1 --quiet
            --data-note "phantoms: app.phantoms seed 1 indices 0-$((N_TRAIN - 1)), size $SIZE")
# Fill the cache once (one process per case would race on nothing, but preparing twice wastes time).
python3 - "$WORK" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from app.io import find_cases
from app.train import prepare_case
work = Path(sys.argv[1])
cases = find_cases(work / "train").cases
with ProcessPoolExecutor(14) as pool:
    list(pool.map(prepare_case, cases, [work / "cache"] * len(cases)))
print("cached", len(cases))
EOF
for k in $(seq 0 $((FOLDS - 1))); do
    python3 -m app train "${train_args[@]}" --fold "$k" --time-limit "$TIME_LIMIT" > "$WORK/train_fold_$k.log" 2>&1 &
done
wait
python3 -m app train "${train_args[@]}" --manifest-only
grep -h "step\|limit" "$WORK"/train_fold_*.log | tail -n 40
tar -C "$WORK" -czf "$OUT/weights.tgz" weights/manifest.json $(cd "$WORK" && ls weights/fold_*.safetensors) \
    $(cd "$WORK" && ls weights/runs/fold_*/result.json)
cat "$WORK"/train_fold_*.log > "$OUT/train_logs.txt"

log "held-out evaluation of the ensemble (post-processing on)"
./run.sh --input "$WORK/heldout" --output "$WORK/pred" --weights "$W" --device "$DEVICE" --quiet 2>&1 | tail -n 3
python3 -m app evaluate --pred "$WORK/pred" --gt "$WORK/heldout" --csv "$OUT/heldout_metrics.csv" | tail -n 2

log "benchmark"
python3 benchmarks/benchmark.py --device "$DEVICE" --configs "$BENCH" --weights "$W" --workdir "$WORK/bench" --case "$WORK/heldout/$(ls "$WORK/heldout" | head -1)" 2>&1 | tee "$OUT/benchmark.md"
log "done"
