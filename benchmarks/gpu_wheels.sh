#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) for a lent GPU machine, whose image has PyTorch but not SimpleITK or cc3d:
# their wheels (and safetensors') are downloaded here, and SimpleITK's, 52 MB, is unpacked and recompressed
# as .tar.xz (about 28 MB) so that the working tree with the weights stays under the 64 MiB a run carries.
# benchmarks/gpu_env.sh, which gpu_session.sh and gpu_check.sh source, installs both forms into /tmp/site.
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]    # the device's Python, e.g. 3.12 (default: this machine's)
# then pass carry [".whl"] to the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps --python-version "$PY" \
    "${platforms[@]}" -d .whl SimpleITK connected-components-3d safetensors
for wheel in .whl/simpleitk-*.whl .whl/SimpleITK-*.whl; do
    [ -e "$wheel" ] || continue
    unpacked=$(mktemp -d)
    python3 -m zipfile -e "$wheel" "$unpacked"
    XZ_OPT="-6 -T2" tar -C "$unpacked" -cJf "${wheel%.whl}.tar.xz" .
    rm -rf "$unpacked" "$wheel"
done
ls -l .whl
du -sh .whl
