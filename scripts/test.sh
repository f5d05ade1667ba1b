#!/usr/bin/env bash
# Installs Quiver and runs the test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/browser.sh
bash scripts/services.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
