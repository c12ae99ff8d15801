#!/usr/bin/env bash
# Build the image from the repository's Dockerfile (CPU variant, offline-capable) and run it exactly as
# challenge platforms do, in both forms, checking every output.
#   CI=true: installs and starts a Docker engine if none answers; any failure fails (exit 1).
#   otherwise: without a running engine the test is skipped (exit 77) with the reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
IMAGE="${OMNET_IMAGE:-omnet-cga:ci}"
BASE="${OMNET_BASE_IMAGE:-omnet-base:bookworm}"
log() { echo "[image-test $(date +%T)] $*"; }

engine_up() { timeout 20 docker info >/dev/null 2>&1; }

start_engine() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        log "installing docker.io and debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
    fi
    log "starting dockerd (host network left alone: --iptables=false --bridge=none)"
    (setsid dockerd --iptables=false --bridge=none >/tmp/omnet-dockerd.log 2>&1 &)
    for _ in $(seq 60); do engine_up && return 0; sleep 1; done
    log "dockerd did not answer; its log:"; tail -20 /tmp/omnet-dockerd.log; return 1
}

if ! engine_up; then
    if [[ "${CI:-}" == "true" && "$(id -u)" != "0" ]]; then
        echo "SKIPPED: CI=true installs packages and starts a Docker engine as root; this user is not root"
        exit 77
    elif [[ "${CI:-}" == "true" ]]; then
        start_engine
    else
        echo "SKIPPED: no Docker engine answers 'docker info' (set CI=true to install and start one)"
        exit 77
    fi
fi
WORK="$(mktemp -d /tmp/omnet-docker-XXXXXX)"  # made only once the test runs: a skip leaves nothing behind
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

debian_mirror() {
    # The machine's own Debian mirror, read from its apt sources (deb822 or one-line format).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [[ -n "$uri" ]] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
    echo "$uri"
}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    mirror="$(debian_mirror)"
    log "building base image $BASE with debootstrap from the machine's mirror"
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

# CI-time build context additions, never committed: CA certificates and the CPU torch wheel.
cp /usr/local/share/ca-certificates/*.crt docker/certs/ 2>/dev/null || true
wheel="$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1 || true)"
torch_spec="torch==2.13.0"
if [[ -n "$wheel" ]]; then cp "$wheel" docker/wheels/; torch_spec="/tmp/wheels/$(basename "$wheel")"; fi
cleanup() { rm -f docker/certs/*.crt docker/wheels/*.whl; rm -rf "$WORK"; }
trap cleanup EXIT

log "building $IMAGE (several minutes; each Dockerfile step is printed as it starts)"
start=$(date +%s)
set -o pipefail
DOCKER_BUILDKIT=0 docker build --network host \
    --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SPEC="$torch_spec" \
    --build-arg WEIGHTS_VERSION="$(sha256sum weights/manifest.json | cut -c1-64)" \
    -t "$IMAGE" . 2>&1 | tee "$WORK/build.log" | { grep --line-buffered '^Step ' || true; } \
    || { tail -40 "$WORK/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s; size $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

export PYTHONPATH="$ROOT"
python3 -m app phantoms --out "$WORK/in" --n 1 --seed 31 --convention 2023 --size 128,128,80 2>/dev/null
python3 -m app phantoms --out "$WORK/in" --n 1 --seed 32 --convention 2018 --size 120,136,72 2>/dev/null
find "$WORK/in" -name '*seg.nii.gz' -delete   # the platforms' input holds images only
chmod -R a+rX "$WORK/in"; chmod a+rx "$WORK"
mkdir -m 777 "$WORK/out" "$WORK/preds"

log "run 1: platform form (--network none, --user 1000:1000, read-only /input)"
docker run --rm --network none --user 1000:1000 -v "$WORK/in:/input:ro" -v "$WORK/out:/output" "$IMAGE"
python3 tests/docker/check_outputs.py "$WORK/in" "$WORK/out"

log "run 2: MLCube form with other folders"
docker run --rm --network none --user 1000:1000 -v "$WORK/in:/data:ro" -v "$WORK/preds:/preds" "$IMAGE" \
    infer --data_path=/data --output_path=/preds
python3 tests/docker/check_outputs.py "$WORK/in" "$WORK/preds"
log "image test passed"
