#!/usr/bin/env bash
# The project's test command (README): installs the pinned dependencies, then runs every test, the Docker
# image test included (it builds and runs the image when CI=true; elsewhere it needs a running engine or
# reports that it was skipped and why).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# A local CPU torch wheel (as on this project's build machines) is preferred over PyPI's CUDA build.
find_links=()
if ls /opt/wheels/torch-*.whl >/dev/null 2>&1; then find_links=(--find-links /opt/wheels); fi
python3 -m pip install -q "${find_links[@]}" -r requirements.txt -r requirements-dev.txt
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "ruff (lint and import order, pyproject.toml):"
python3 -m ruff check .
# -rs: say why a test was skipped; --durations: name the slow ones (the whole run takes 15-25 minutes here).
python3 -m pytest -q -rs --durations=10 -p no:cacheprovider tests "$@"
