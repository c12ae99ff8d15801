# OM-Net + CGA BraTS segmentation container.
#
# Default build = the GPU image: Python 3.11 with PyTorch's CUDA build from PyPI.
#   docker build -t omnet-cga .
#   docker run --gpus all -v IN:/input:ro -v OUT:/output omnet-cga
# CPU/offline build (what CI does): a local Debian base and the CPU torch wheel placed in docker/wheels/:
#   docker build --build-arg BASE_IMAGE=omnet-base:bookworm \
#       --build-arg TORCH_SPEC=/tmp/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl -t omnet-cga:cpu .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG WEIGHTS_VERSION=unknown
LABEL org.opencontainers.image.title="OM-Net + CGA BraTS segmentation" \
      org.opencontainers.image.description="One-pass multi-task network with cross-task guided attention (Zhou et al.)" \
      omnet.weights.manifest-sha256="${WEIGHTS_VERSION}"

# Bare Debian bases (CI's debootstrap image) have no Python: install the distribution's 3.11.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# CA certificates a build machine needs to reach the package index (copied in at CI time, never committed).
COPY docker/certs/ /usr/local/share/ca-certificates/omnet/
RUN if ls /usr/local/share/ca-certificates/omnet/*.crt >/dev/null 2>&1; then update-ca-certificates; fi

COPY docker/wheels/ /tmp/wheels/
COPY requirements.txt /opt/omnet/requirements.txt
RUN python3 -m venv /opt/venv \
    && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    && /opt/venv/bin/pip install "${TORCH_SPEC}" \
    && grep -v '^torch==' /opt/omnet/requirements.txt > /tmp/requirements-no-torch.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements-no-torch.txt \
    && rm -rf /tmp/wheels /tmp/requirements-no-torch.txt

COPY run.sh /opt/omnet/run.sh
COPY app/ /opt/omnet/app/
COPY weights/ /opt/omnet/weights/
# Compile bytecode now so the container never writes next to the code; everything world-readable so any
# --user uid can run it.
RUN /opt/venv/bin/python -m compileall -q /opt/omnet/app \
    && chmod -R a+rX /opt/omnet /opt/venv && chmod a+rx /opt/omnet/run.sh

ENV PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
WORKDIR /tmp
ENTRYPOINT ["/opt/omnet/run.sh"]
