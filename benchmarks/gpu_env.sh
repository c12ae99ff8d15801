# Sourced by the GPU session scripts: Python settings, a timestamped log helper, a weights folder's fold summary,
# and the environment report.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "=== $(date +%T) $*"; }
# One line per fold of a weights folder: fold, steps, best step, validation Dice.
fold_summary() {
    python3 - "$1" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
for f in m["folds"]:
    print(f["fold"], f["steps"], f["best_step"], {k: round(v, 3) for k, v in f["validation_dice"].items()})
PY
}

# Carried packages (benchmarks/gpu_wheels.sh; the GPU image lacks SimpleITK and cc3d): .whl/*.whl installed
# as they are, .whl/*.tar.xz = wheels unpacked and recompressed (SimpleITK's 52 MB wheel is 28 MB so),
# extracted straight into the target folder.
if ls .whl/*.whl .whl/*.tar.xz >/dev/null 2>&1; then
    mkdir -p /tmp/site
    for t in .whl/*.tar.xz; do [ -e "$t" ] && tar -C /tmp/site -xJf "$t"; done
    for w in .whl/*.whl; do
        [ -e "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --upgrade "$w"
    done
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

log "environment"
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
