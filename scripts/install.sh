#!/usr/bin/env bash
# Installs Quiver into .venv: torch's CPU wheel first (pinned), then the project and its tools.
#
# torch: `pip install torch==2.13.0` takes a local CPU wheel on the development machines; elsewhere PyPI's
# torch is the CUDA build (GBs). Set QUIVER_TORCH_INDEX_URL to an index that serves the CPU wheel, e.g.
#   QUIVER_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check)
# Any other torch spec pulls GBs of CUDA packages: keep the pin, and install it before sentence-transformers.
if [ -n "${QUIVER_TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" --index-url "$QUIVER_TORCH_INDEX_URL" torch==2.13.0
else
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -e '.[dev,production]'
