#!/usr/bin/env bash
# The test command: install if needed, lint, then the whole suite (real vLLM on the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
