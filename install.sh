#!/usr/bin/env bash
# Creates .venv and installs Story Arena. `--dev` adds the test tools and Debian's chromium.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU wheel on the build machines (never a CUDA download).
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -r requirements-starter.txt
if [[ "${1:-}" == "--dev" ]]; then
  .venv/bin/pip install -q -r requirements-dev.txt
  if ! command -v chromium >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium
  fi
fi
