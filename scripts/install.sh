#!/usr/bin/env bash
# Installs Quiver into .venv: torch's CPU wheel first (pinned), then the project and its tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Any other torch spec pulls GBs of CUDA packages: keep the pin, and install it before sentence-transformers.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev,production]'
