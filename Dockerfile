# syntax=docker/dockerfile:1.7
# deepseek-serve image. Targets:
#   runtime       (default, last stage) CPU: llama.cpp over GGUF, no torch, no compilers
#   runtime-cuda  adds the PyTorch runner (torch==2.13.0 from PyPI bundles the CUDA runtime;
#                 the host needs the NVIDIA driver and the NVIDIA Container Toolkit)
# Build:  docker build -t deepseek-serve:cpu .
#         docker build --target runtime-cuda -t deepseek-serve:cuda .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- base: shared by every stage -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    LANG=C.UTF-8

# --- builder: compilers, wheels, one virtual environment at /opt/venv ----------------------------
FROM base AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# llama.cpp first, in its own layer: the slow step (~10 min on 2 cores) is rebuilt only when its
# version or flags change. GGML_NATIVE=OFF: portable x86-64 (AVX2/FMA/F16C), not the build host's CPU.
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip install "llama-cpp-python==${LLAMA_CPP_VERSION}"

# the application and its pure-Python / prebuilt-wheel dependencies
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-compile .

# the two environments the runtime targets copy, each slimmed (deploy/docker/slim-venv.sh)
FROM builder AS venv-cpu
COPY deploy/docker/slim-venv.sh /usr/local/bin/slim-venv
RUN slim-venv /opt/venv

FROM builder AS venv-cuda
ARG TORCH_VERSION=2.13.0
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-compile ".[torch]" "torch==${TORCH_VERSION}"
COPY deploy/docker/slim-venv.sh /usr/local/bin/slim-venv
RUN slim-venv /opt/venv

# --- runtime: no compilers, non-root, read-only root filesystem ----------------------------------
FROM base AS runtime-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/*
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} app \
 && useradd --system --uid ${APP_UID} --gid app --home-dir /data --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /data /models \
 && chown app:app /data /models
COPY deploy/docker/healthcheck.py /usr/local/lib/deepseek-serve/healthcheck.py
# writable paths are /data (database, spool), /models (hub cache) and /tmp; mount them as
# volumes or tmpfs when running with --read-only. HOME points at /data for libraries that want one.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/data \
    DS_HOST=0.0.0.0 \
    DS_PORT=8000 \
    DS_DATA_DIR=/data \
    DS_MODEL_CACHE_DIR=/models \
    DS_LOG_FORMAT=json \
    HF_HOME=/models/huggingface \
    MODELSCOPE_CACHE=/models/modelscope
VOLUME ["/data", "/models"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/usr/local/lib/deepseek-serve/healthcheck.py"]
USER ${APP_UID}:${APP_UID}
# tini is PID 1: it forwards SIGTERM to the server and reaps zombies; exit code passes through.
ENTRYPOINT ["tini", "--", "deepseek-serve"]
CMD ["serve", "--host", "0.0.0.0"]

FROM runtime-base AS runtime-cuda
COPY --from=venv-cuda /opt/venv /opt/venv
ENV DS_DEVICE=auto NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-base AS runtime
COPY --from=venv-cpu /opt/venv /opt/venv
ENV DS_DEVICE=cpu
