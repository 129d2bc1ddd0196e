#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install MedSegX into it.
# Re-running is cheap: nothing is reinstalled when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
PYTHON=${PYTHON:-python3}
VENV=${MEDSEGX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.medsegx-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "[setup] installing MedSegX and its dependencies at the versions of constraints.txt (torch 2.14.1, ...)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
    touch "$stamp"
fi
