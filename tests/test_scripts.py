"""The launchers in scripts/: valid bash, and each one reaches its Python script (``--help``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))

# launcher -> the Python script whose usage it must print (each Python start costs a few seconds)
LAUNCHERS = {
    "pretrain.sh": "pretrain.py",
    "finetune-site.sh": "finetune.py",
    "finetune-task.sh": "finetune.py",
    "evaluate-id.sh": "evaluate_internal.py",
    "evaluate-ood.sh": "evaluate_external.py",
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_runs_its_script_with_the_given_python(launcher):
    # MEDSEGX_PYTHON names the interpreter (CI's venv is not .venv); the launcher must pass flags through.
    env = dict(os.environ, MEDSEGX_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / launcher), "--help"], capture_output=True, text=True,
                          cwd="/", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: {LAUNCHERS[launcher]}" in proc.stdout
