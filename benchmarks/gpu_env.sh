# Sourced by the GPU session scripts: Python settings, a timestamped log helper, and the environment report.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "=== $(date +%T) $*"; }

log "environment"
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
