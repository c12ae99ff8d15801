#!/usr/bin/env bash
# Several folds or networks at once on a lent GPU, each in its own process (a width-16 network does not fill an
# H200: three processes ran at 6-9 steps a second each, four at 5; docs/EXPERIMENTS.md, round 34), all on the
# same prepared phantoms for the same wall time. Each arm returns its fold as weights_<arm>.tar (manifest, run
# result, fold file; 7 MB at width 16), under the 16 MiB and 8 files a call returns (with the one log).
# ARMS is a space-separated list of name:width:D,H,W:batch[:fold[:init]], fold 0 by default; init, a weights
# folder in the carried tree (e.g. runs/w16, git-ignored, carry ["runs/w16", ".whl"]; training does not need
# SimpleITK, so leave its 29 MB wheel out of .whl/ and six width-16 folds fit the 64 MiB), starts the fold from
# its own fold there instead of a random start, without the curriculum (STAGES_INIT). Otherwise round 31's recipe.
# Round 34 (the network): ARMS="w16p16:16:16,32,32:40 w16p24:16:24,48,48:16 w8p16:8:16,32,32:40".
# Round 35 (folds 5-9 from scratch): ARMS="f5:16:24,48,48:16:5 ... f9:16:24,48,48:16:9"; each returned fold goes
# into the width-16 folder with `python3 -m app combine`; the next sessions' calls: docs/WEIGHTS.md.
# A second call while the machine is still warm (it goes back after 30 s idle, so have the call ready) finds
# the prepared phantoms in $WORK/cache: 7 s instead of 116 (round 35), so a session's last ~300 s still train.
# Compare a fold with the shipped fold alone on this CPU afterwards (`./run.sh --weights <arm folder>`, then
# `python3 -m app evaluate`).
# Dry run on a CPU: DEVICE=cpu N_TRAIN=20 SIZE=64,64,48 TRAIN_SECONDS=20 ARMS="a:8:16,32,32:2:1" bash benchmarks/gpu_folds.sh
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; N_TRAIN="${N_TRAIN:-160}"; SEED="${SEED:-1919}"; SIZE="${SIZE:-240,240,155}"
ARMS="${ARMS:?name:width:D,H,W:batch[:fold[:init]] ...}"
DEADLINE="${DEADLINE:-540}"  # seconds from the start by which the weights are packed
STAGES="${STAGES:-150,150,100000}"; STAGES_INIT="${STAGES_INIT:-0,0,100000}"; LR="${LR:-1e-2}"; HALVE="${HALVE:-1200}"; AVERAGE_FROM="${AVERAGE_FROM:-600}"
# Augmentation of even and odd folds: the shipped ten mix two levels; round 35's folds, all default, shared
# their errors (docs/EXPERIMENTS.md).
AUGMENT_EVEN="${AUGMENT_EVEN:-default}"; AUGMENT_ODD="${AUGMENT_ODD:-default}"
# How much more often a rare tumour kind is drawn (train's --rare-case-weight). About half of a mixed series
# is a rare kind, mostly small cores, so this barely moves the tumours without ET (docs/EXPERIMENTS.md,
# round 36).
RARE_WEIGHT="${RARE_WEIGHT:-2}"
# Percentage of cases drawn with a cortex as bright as edema on FLAIR (train's --phantom-bright-cortex): the
# cue our generator otherwise never contradicts, and what the shipped folds' last fine-tune drew (round 43).
BRIGHT_CORTEX="${BRIGHT_CORTEX:-50}"
# train's --bias-correction: n4 trains on N4-corrected phantoms, as predict corrects a case (round 66: +0.014
# mean Dice over the same CPU fine-tune without it); it needs SimpleITK's wheel carried in .whl/ (29 MB) and
# adds about 9 s of preparing per case and worker.
BIAS_CORRECTION="${BIAS_CORRECTION:-none}"
WORKERS="${WORKERS:-16}"; WORK="${WORK:-/tmp/omnet_pilot}"; mkdir -p "$WORK"
source "$(dirname "$0")/gpu_env.sh"
# COMPILE=1: train's --compile (1.2-1.4x faster width-16 steps on a CPU, unmeasured on a GPU; docs/SPEED.md).
# Probed first with train's own check, so a machine where torch.compile cannot run trains eager steps instead
# of failing every arm.
compile_flag=()
if [ "${COMPILE:-0}" = 1 ]; then
    if python3 -c "import torch; from app.train import TrainConfig, check_compile; check_compile(TrainConfig(), torch.device('$DEVICE'))" > /dev/null 2>&1; then
        compile_flag=(--compile); log "training steps compiled (torch.compile)"
    else
        log "torch.compile cannot run here: eager training steps"
    fi
fi

common=(--phantoms "$N_TRAIN" --phantom-seed "$SEED" --phantom-size "$SIZE" --phantom-ranges mixed
        --phantom-bright-cortex "$BRIGHT_CORTEX" --bias-correction "$BIAS_CORRECTION"
        --folds 10 --lr "$LR" --momentum 0.9 --lr-halve-every "$HALVE"
        --average-from "$AVERAGE_FROM" --validate-every 100000 --val-cases 4 --rare-case-weight "$RARE_WEIGHT"
        --task1-tumour-fraction 0.3 --augment-acquisition 0.25
        --device "$DEVICE" --cache "$WORK/cache" --threads 2 --quiet
        --data-note "phantoms generated in memory: app.phantoms generator 2, mixed ranges, bright cortex in $BRIGHT_CORTEX% of cases, bias correction $BIAS_CORRECTION, seed $SEED, $N_TRAIN cases, size $SIZE")
log "preparing $N_TRAIN phantoms (seed $SEED, size $SIZE) with $WORKERS workers"
python3 -m app train "${common[@]}" --stage-steps "$STAGES" --out "$WORK/prep" --width 8 --prepare-workers "$WORKERS" --prepare-only 2>&1 | tail -n 2
# About 25 s of each arm go to loading the cases onto the GPU and to the last validation and save.
TRAIN_SECONDS="${TRAIN_SECONDS:-$(( DEADLINE - SECONDS - 45 ))}"
log "training arms ($ARMS) concurrently, ${TRAIN_SECONDS}s each"
pids=()
for arm in $ARMS; do
    IFS=: read -r name width patch batch fold init <<< "$arm"
    stages="$STAGES"; [ -n "$init" ] && stages="$STAGES_INIT"
    augment="$AUGMENT_EVEN"; (( ${fold:-0} % 2 )) && augment="$AUGMENT_ODD"
    python3 -m app train "${common[@]}" --stage-steps "$stages" --out "$WORK/$name" --width "$width" --patch-size "$patch" --batch "$batch" \
        --fold "${fold:-0}" ${init:+--init-from "$init"} --augment "$augment" --time-limit "$TRAIN_SECONDS" \
        ${compile_flag[@]+"${compile_flag[@]}"} > "$WORK/train_$name.txt" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "arm exit status $?"; done
for arm in $ARMS; do
    IFS=: read -r name width patch batch fold init <<< "$arm"
    { echo "--- $name"; cat "$WORK/train_$name.txt"; } >> "$OUT/train_log.txt"
    echo "--- $name"; tail -n 3 "$WORK/train_$name.txt"
    fold_summary "$WORK/$name"
    (cd "$WORK/$name" && tar -cf "$OUT/weights_$name.tar" manifest.json "runs/fold_${fold:-0}/result.json" \
        "fold_${fold:-0}.safetensors")
done
nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null
ls -la "$OUT"
log "done"
