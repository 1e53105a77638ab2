# syntax=docker/dockerfile:1.7
# P2R GPU image (NVIDIA, CUDA 12.8): the same commands as the CPU image with the `gpu` extra
# (vllm 0.33.0 CUDA build, flash-attn for training). flash-attn compiles against the installed
# torch, so vllm (which pins torch) goes in first and flash-attn is built without isolation.
#   docker build -f docker/gpu.Dockerfile -t ghcr.io/p2r-platform/p2r-gpu:0.1.0 .
ARG CUDA_VERSION=12.8.1
ARG BUILD_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu22.04
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu22.04

FROM ${BUILD_IMAGE} AS build
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git build-essential ninja-build \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/p2r
ENV PATH=/opt/p2r/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY p2r p2r
COPY services services
COPY trainer trainer
COPY controller controller
RUN pip install --upgrade pip wheel packaging \
 && pip install "vllm==0.33.0" \
 && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation "flash-attn>=2.7" \
 && pip install ".[gpu]" \
 && python -c "import torch, vllm, flash_attn, transformers, p2r, p2r.v1.p2r_pb2, p2r.services.server" \
 && p2r --help >/dev/null

FROM ${RUNTIME_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 libnuma1 \
 && apt-get purge -y software-properties-common && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 p2r \
 && useradd --uid 10001 --gid 10001 --home-dir /home/p2r --create-home --shell /usr/sbin/nologin p2r
# The venv's interpreter links to /usr/bin/python3.11, installed identically in both stages.
COPY --from=build /opt/p2r /opt/p2r
ENV PATH=/opt/p2r/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/p2r
USER 10001:10001
WORKDIR /home/p2r
EXPOSE 50051 9090 8080
ENTRYPOINT ["p2r"]
CMD ["--help"]
