# syntax=docker/dockerfile:1
# ringserve, the appliance image for one GPU box: supervisord runs the engine and the HTTP workers.
#
#   docker build -t ringserve .
#   docker run -d --restart unless-stopped --gpus all --shm-size=1g --stop-timeout 45 -p 8000:8000 ringserve
#
# --gpus all      the GPU, through the NVIDIA Container Toolkit; the host driver must support CUDA 13
#                 (R580 or newer). Without a GPU the same image serves on the CPU (RINGSERVE_PROVIDERS=auto).
# --shm-size=1g   each HTTP worker maps a ring of RINGSERVE_RING_SLOTS slots of one model input in
#                 /dev/shm: 32 x 270 KB = 9 MB for the 300x300 SSD, 32 x 1.2 MB = 39 MB for a 640x640
#                 model. Docker's 64 MB default runs out after a few workers; the ring of a worker
#                 that cannot map it gets a bus error, not a clean 503.
# --stop-timeout  supervisord first lets the workers drain (RINGSERVE_DRAIN_TIMEOUT_S, 15 s), then
#                 stops the engine; Docker's 10 s default would SIGKILL the drain.
# --restart       when the engine cannot start (no model, broken GPU), supervisord exits (status 0)
#                 rather than keep a box up that is never ready: restart it with unless-stopped or always.

# ---- build: the "convert" extra (TensorFlow + tf2onnx, about 2 GB) only turns the TensorFlow graph into
# ONNX; the runtime stage takes the converted model from here and nothing else.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ipc ipc
COPY engine engine
COPY frontend frontend
# The very install and pull of README command 1 and .ci/run (the build writes ./models). The cache
# mount keeps pip's wheels and the conversion (cached by the source's sha256) between builds, out of
# the image.
RUN --mount=type=cache,target=/root/.cache \
    python3 -m venv .venv && .venv/bin/pip install -e ".[convert]" && .venv/bin/ringserve models pull

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

# ---- runtime: CUDA 13 + cuDNN 9, the libraries onnxruntime-gpu 1.31 is built against (libcudart.so.13,
# libcublas.so.13, libcudnn.so.9).
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS runtime
LABEL org.opencontainers.image.title="ringserve" \
      org.opencontainers.image.description="Image-inference appliance: N HTTP workers, one ONNX Runtime engine" \
      org.opencontainers.image.licenses="Apache-2.0"
# Python 3.11: Ubuntu 24.04 ships 3.12 only. uv installs a python-build-standalone CPython 3.11
# (self-contained, its own OpenSSL, relocatable; the exact build is pinned by the uv version) with no
# PPA, no apt key and no system Python beside it; uv itself is only mounted for this step. The
# deadsnakes PPA would also work, but needs add-apt-repository (software-properties-common pulls in
# Python 3.12) or a hand-managed signing key, and makes no promise of timely security fixes.
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /src
# `pip install .` of the runtime dependencies (onnxruntime-gpu, no extra) plus supervisor, from the
# build context mounted read-write for this step only, so no source copy stays in a layer.
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache \
    uv python install 3.11 \
    && "$(uv python find 3.11)" -m venv /opt/venv \
    && /opt/venv/bin/pip install . "supervisor==4.3.0"
RUN groupadd --system --gid 10001 ringserve \
    && useradd --system --uid 10001 --gid 10001 --no-log-init --create-home ringserve \
    && install -d -o ringserve -g ringserve -m 0700 /run/ringserve
COPY --from=build /src/models /models
COPY supervisord.conf /app/supervisord.conf
# Every setting has a default (README); these are the image's paths and the address to listen on.
ENV PATH=/opt/venv/bin:$PATH \
    RINGSERVE_MODEL_REPO=/models \
    RINGSERVE_RUN_DIR=/run/ringserve \
    RINGSERVE_HOST=0.0.0.0 \
    RINGSERVE_PORT=8000 \
    RINGSERVE_GRPC_PORT=8001
# numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
# supervisord keeps its pid file and control socket in its working directory (supervisord.conf)
WORKDIR /run/ringserve
# HTTP (REST, V2, DeepStack, WebSocket, /metrics) and Triton's gRPC
EXPOSE 8000 8001
# Ready = the engine is connected with its models (503 before); urllib raises on a 503, so no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RINGSERVE_PORT', '8000') + '/health/ready', timeout=2)"]
# supervisord is PID 1: it reaps orphans, and on SIGTERM stops the workers (drain) before the engine.
# CMD rather than ENTRYPOINT, so that `docker run --rm ringserve ringserve models list` works too.
CMD ["supervisord", "-n", "-c", "/app/supervisord.conf"]
