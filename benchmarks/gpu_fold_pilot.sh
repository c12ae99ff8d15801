#!/usr/bin/env bash
# One fold, several networks at once, on a lent GPU: which network is worth ten folds of the next sessions.
# Every arm trains fold 0 of the ten-fold split from a random start, all arms concurrently in their own process
# on the same prepared phantoms (a small network does not fill an H200, so concurrent arms cost little speed
# each), for the same wall time; each returns its fold as weights_<arm>.tar (manifest, run result, fold_0).
# Compare each arm alone with the shipped fold 0 alone on this CPU afterwards (`python3 -m app predict --folds 0
# --weights <arm folder>`, then `python3 -m app evaluate`; docs/EXPERIMENTS.md, round 34).
# ARMS is a space-separated list of name:width:D,H,W:batch; the rest of the recipe is round 31's, from scratch.
# Dry run on a CPU: DEVICE=cpu N_TRAIN=6 SIZE=96,96,64 TRAIN_SECONDS=20 ARMS="a:8:16,32,32:2" bash benchmarks/gpu_fold_pilot.sh
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; N_TRAIN="${N_TRAIN:-160}"; SEED="${SEED:-1919}"; SIZE="${SIZE:-240,240,155}"
ARMS="${ARMS:-w16p16:16:16,32,32:40 w16p24:16:24,48,48:16 w8p16:8:16,32,32:40}"
DEADLINE="${DEADLINE:-540}"  # seconds from the start by which the weights are packed
STAGES="${STAGES:-150,150,100000}"; LR="${LR:-1e-2}"; HALVE="${HALVE:-1200}"; AVERAGE_FROM="${AVERAGE_FROM:-600}"
WORKERS="${WORKERS:-16}"; WORK="${WORK:-/tmp/omnet_pilot}"; mkdir -p "$WORK"
source "$(dirname "$0")/gpu_env.sh"

common=(--phantoms "$N_TRAIN" --phantom-seed "$SEED" --phantom-size "$SIZE" --phantom-ranges mixed
        --folds 10 --stage-steps "$STAGES" --lr "$LR" --momentum 0.9 --lr-halve-every "$HALVE"
        --average-from "$AVERAGE_FROM" --validate-every 100000 --val-cases 4 --rare-case-weight 2
        --task1-tumour-fraction 0.3 --augment default --augment-acquisition 0.25
        --device "$DEVICE" --cache "$WORK/cache" --threads 2 --quiet
        --data-note "phantoms generated in memory: app.phantoms generator 2, mixed ranges, seed $SEED, $N_TRAIN cases, size $SIZE")
log "preparing $N_TRAIN phantoms (seed $SEED, size $SIZE) with $WORKERS workers"
python3 -m app train "${common[@]}" --out "$WORK/prep" --width 8 --prepare-workers "$WORKERS" --prepare-only 2>&1 | tail -n 2
# About 25 s of each arm go to loading the cases onto the GPU and to the last validation and save.
TRAIN_SECONDS="${TRAIN_SECONDS:-$(( DEADLINE - SECONDS - 45 ))}"
log "training arms ($ARMS) concurrently, ${TRAIN_SECONDS}s each"
pids=()
for arm in $ARMS; do
    IFS=: read -r name width patch batch <<< "$arm"
    python3 -m app train "${common[@]}" --out "$WORK/$name" --width "$width" --patch-size "$patch" --batch "$batch" \
        --fold 0 --time-limit "$TRAIN_SECONDS" > "$OUT/train_$name.txt" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "arm exit status $?"; done
for arm in $ARMS; do
    name="${arm%%:*}"
    echo "--- $name"; tail -n 3 "$OUT/train_$name.txt"
    python3 - "$WORK/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
for f in m["folds"]:
    print(f["fold"], f["steps"], f["best_step"], {k: round(v, 3) for k, v in f["validation_dice"].items()})
PY
    (cd "$WORK/$name" && tar -cf "$OUT/weights_$name.tar" manifest.json runs/fold_0/result.json fold_0.safetensors)
done
nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null
ls -la "$OUT"
log "done"
