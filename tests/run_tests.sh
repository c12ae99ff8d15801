#!/usr/bin/env bash
# The project's test command (README): installs the pinned dependencies, then runs every test, the Docker
# image test included (it builds and runs the image when CI=true; elsewhere it needs a running engine or
# reports that it was skipped and why).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -p no:cacheprovider tests "$@"
