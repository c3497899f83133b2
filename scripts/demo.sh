#!/usr/bin/env bash
# make demo: see scripts/demo.py
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-$PWD/.venv}/bin/python" scripts/demo.py "$@"
