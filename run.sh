#!/usr/bin/env bash
# Entry point of the container and of local use.
#   ./run.sh [predict flags]         segment /input into /output (flags override the defaults)
#   ./run.sh infer --data_path=DIR --output_path=DIR [--parameters_file=FILE]   MLCube form
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
# No writable HOME is needed: keep library caches in /tmp (runs as any uid).
export HOME="${HOME:-/tmp}" MPLCONFIGDIR="${MPLCONFIGDIR:-/tmp}" PYTHONDONTWRITEBYTECODE=1
python="${PYTHON:-python3}"

if [[ "${1:-}" == "infer" ]]; then
    exec "$python" -m app "$@"
fi
for arg in "$@"; do
    case "$arg" in
        -h|--help)
            echo "run.sh supplies --input /input --output /output (the container's folders); pass them to override."
            exec "$python" -m app predict --help ;;
    esac
done
# argparse takes the last occurrence of a flag, so user flags after the defaults win.
exec "$python" -m app predict --input /input --output /output "$@"
