#!/usr/bin/env bash
# One GPU session, prepared to run once on a lent machine (also runs on a CPU as a dry run):
#   1. environment; carried wheels (SimpleITK, cc3d) installed when present
#   2. the phantom training set generated and prepared in parallel, in memory (no NIfTI files)
#   3. the ten folds trained one after another in ONE process, every case resident on the GPU, augmentation
#      on the GPU, no host synchronisation per step (with the first session's trainer, which synchronised every
#      step, ten concurrent fold processes ran no faster than a 2-core CPU; today's runs several well at once:
#      benchmarks/gpu_folds.sh, README, On a GPU)
#   4. weights returned as tarballs weights_0.tar, weights_1.tar, ... (each under the 16 MiB a session can
#      return); logs; a short CUDA benchmark of the new ensemble and of width 32 if time is left
# Settings come from the environment; DEVICE=cpu N_TRAIN=6 SIZE=96,96,64 FOLDS=2 FOLD_SECONDS=10 dry-runs it.
# To fine-tune an ensemble instead of training from scratch, or to resume a from-scratch ensemble in a later
# session: INIT_FROM=<folder> (each fold K starts from its fold K) with STAGES=0,0,100000 and any further train
# flags in TRAIN_EXTRA, on a series never trained on (SEED=1919 or later; 101-606 by hundreds, the wide 707,
# 909, 1212, 1313, 1414, 1515, 1616 and the mixed 808, 1111 and 1717 have been). Fine-tuning the shipped
# folds is closed: round 33 (docs/EXPERIMENTS.md) did it on a GPU for 24 s a fold and gained 0.002.
# From scratch, the CPU rounds suggest drawing from the start what their fine-tunes could not add later, e.g.
# TRAIN_EXTRA="--phantom-ranges mixed --augment-acquisition 0.25" (docs/EXPERIMENTS.md, rounds 15-30), with
# --average-from 400 to publish a weight average (round 32: worth 0.095 Dice over a fold's last weights).
# PATCH=24,48,48 trains on the context the fast tiling gives the network at inference (3.4x the voxels of a
# 16x32x32 patch: lower BATCH to keep the step's cost; README, Training).
# Even folds train with --augment default, odd folds with strong (a measured comparison inside one ensemble).
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; WIDTH="${WIDTH:-8}"
N_TRAIN="${N_TRAIN:-120}"; SEED="${SEED:-101}"; SIZE="${SIZE:-240,240,155}"
FOLDS="${FOLDS:-10}"; STAGES="${STAGES:-150,150,60000}"
DEADLINE="${DEADLINE:-555}"  # seconds from the start by which everything, the benchmark included, is done
BATCH="${BATCH:-20}"; PATCH="${PATCH:-16,32,32}"; VALIDATE="${VALIDATE:-400}"; HALVE="${HALVE:-1200}"; LR="${LR:-1e-2}"
AUGMENT_EVEN="${AUGMENT_EVEN:-default}"; AUGMENT_ODD="${AUGMENT_ODD:-strong}"; WORKERS="${WORKERS:-16}"; VAL_CASES="${VAL_CASES:-4}"
BENCH="${BENCH:-shipped-fast-all,shipped-paper-all,w32-fast-all}"; BENCH_SECONDS="${BENCH_SECONDS:-100}"
WORK="${WORK:-/tmp/omnet_work}"; mkdir -p "$WORK"
INIT_FROM="${INIT_FROM:-}"; read -r -a extra <<< "${TRAIN_EXTRA:-}"
source "$(dirname "$0")/gpu_env.sh"

W="$WORK/weights"
train_args=(--phantoms "$N_TRAIN" --phantom-seed "$SEED" --phantom-size "$SIZE" --out "$W" --width "$WIDTH"
            --folds "$FOLDS" --stage-steps "$STAGES" --batch "$BATCH" --patch-size "$PATCH" --lr "$LR" --momentum 0.9
            --validate-every "$VALIDATE" --lr-halve-every "$HALVE" --val-cases "$VAL_CASES"
            --device "$DEVICE" --cache "$WORK/cache" --threads 4 --quiet
            --data-note "phantoms generated in memory: app.phantoms generator 2, seed $SEED, $N_TRAIN cases, size $SIZE"
            ${INIT_FROM:+--init-from "$INIT_FROM"} "${extra[@]}")
log "preparing $N_TRAIN phantoms (seed $SEED, size $SIZE) with $WORKERS workers"
python3 -m app train "${train_args[@]}" --prepare-workers "$WORKERS" --prepare-only 2>&1 | tail -n 2
# The folds share what is left of the deadline (about 5 s per fold go to loading and the last validation).
FOLD_SECONDS="${FOLD_SECONDS:-$(( (DEADLINE - SECONDS - BENCH_SECONDS - 40) / FOLDS - 5 ))}"
even=$(seq -s, 0 2 $((FOLDS - 1))); odd=$(seq -s, 1 2 $((FOLDS - 1)))
log "training folds $even (augment $AUGMENT_EVEN) then $odd (augment $AUGMENT_ODD), one process each: width $WIDTH, ${FOLD_SECONDS}s per fold"
python3 -m app train "${train_args[@]}" --fold "$even" --augment "$AUGMENT_EVEN" --time-limit "$FOLD_SECONDS" > "$OUT/train_log.txt" 2>&1
echo "train exit status $?"
[ -n "$odd" ] && python3 -m app train "${train_args[@]}" --fold "$odd" --augment "$AUGMENT_ODD" --time-limit "$FOLD_SECONDS" >> "$OUT/train_log.txt" 2>&1
echo "train exit status $?"
python3 -m app train "${train_args[@]}" --manifest-only
grep -h "time limit\|step" "$OUT/train_log.txt" | tail -n 25
fold_summary "$W"
# The weights come back as tarballs of whole folds, each under PACK_LIMIT bytes: a session returns files of at
# most 16 MiB, 8 a call, and a fold is 1.8 MB at width 8 but 7 MB at width 16 (float16), so two fixed halves
# of ten width-16 folds (35 MB each) would not come back. The manifest and the runs' results go first.
PACK_LIMIT="${PACK_LIMIT:-15000000}"
pack_members=(manifest.json $(cd "$W" && ls runs/fold_*/result.json)); pack_bytes=0; packs=0
pack_flush() {
    tar -C "$W" -cf "$OUT/weights_$packs.tar" "${pack_members[@]}"
    packs=$((packs + 1)); pack_members=(); pack_bytes=0
}
for f in $(cd "$W" && ls fold_*.safetensors | sort -V); do
    bytes=$(stat -c %s "$W/$f")
    [ "$bytes" -gt "$PACK_LIMIT" ] && log "WARNING: $f alone is $bytes bytes, over PACK_LIMIT: it will not come back"
    if [ "${#pack_members[@]}" -gt 0 ] && [ $((pack_bytes + bytes)) -gt "$PACK_LIMIT" ]; then pack_flush; fi
    pack_members+=("$f"); pack_bytes=$((pack_bytes + bytes))
done
[ "${#pack_members[@]}" -gt 0 ] && pack_flush
# Two more files come back (train_log.txt, benchmark.md) and a call returns at most 8.
[ "$packs" -gt 6 ] && log "WARNING: $packs weight tarballs: more than a session returns in one call with the logs"
ls -la "$OUT"

log "benchmark (${BENCH_SECONDS}s at most)"
python3 -m app phantoms --out "$WORK/bench_in" --n 1 --seed 2 --size "$SIZE" 2>/dev/null
timeout "$BENCH_SECONDS" python3 benchmarks/benchmark.py --device "$DEVICE" --configs "$BENCH" --weights "$W" \
    --workdir "$WORK/bench" --case "$WORK/bench_in/$(ls "$WORK/bench_in" | head -1)" 2>&1 | tee "$OUT/benchmark.md"
log "done"
