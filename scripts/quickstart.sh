#!/usr/bin/env bash
# Quick start: install, then materialize the whole pipeline on the embedded default
# (bundled model, SQLite instance in dagster_home/, Parquet, FAISS and Milvus Lite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DAGSTER_HOME="$PWD/dagster_home"
exec .venv/bin/quiver run "$@"
