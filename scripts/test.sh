#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
bash scripts/setup-env.sh
VENV=${MEDSEGX_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
