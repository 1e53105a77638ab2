#!/usr/bin/env bash
# The test command: install if needed, lint, then the whole suite (real vLLM on the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# promtool (Debian's prometheus package) checks the chart's alert rules and serves the scrape test.
if ! command -v promtool >/dev/null; then
  echo "p2r test: installing Debian's prometheus package (promtool)" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q prometheus >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; }
fi
# chromium + chromium-driver (Debian's) run the gateway page's browser test (tests/test_browser.py).
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  echo "p2r test: installing Debian's chromium and chromium-driver (browser test)" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
