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
    "evaluate-external.sh": "evaluate_external.py",
    "pretrain-multinode.sh": "pretrain.py",
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


@pytest.mark.parametrize("script", [s for s in SCRIPTS if not s.name.startswith("_")], ids=lambda p: p.name)
def test_every_script_answers_help_without_working(script, tmp_path):
    """--help prints the script's usage and exits 0: no set-up, no download, no job (run from a copy of the
    repository's scripts, so any work would show up there)."""
    env = dict(os.environ, MEDSEGX_PYTHON=sys.executable, MEDSEGX_VENV=str(tmp_path / "no-venv"))
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: bash scripts/{script.name}") or "usage: bash scripts/" in proc.stdout
    assert not (tmp_path / "no-venv").exists()  # setup-env.sh did not run
    assert "Traceback" not in proc.stderr


def test_readme_lists_every_command():
    """The README's Install section names exactly the registered commands."""
    from medsegx.cli import COMMANDS

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Install"):readme.index("## Where things go")]
    listed = {line.split()[1] for line in section.splitlines() if line.startswith("medsegx ")}
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("how", [["-m", "medsegx", "pretrain"], ["pretrain.py"], ["prepare_data.py"], ["predict.py"],
                                 ["-m", "medsegx", "prepare"], ["-m", "medsegx", "predict"]])
def test_help_is_instant_and_loads_no_torch(how):
    """--help of the commands and the shims imports neither torch nor SimpleITK (python -X importtime shows
    none): the parsers take their choices from light modules (medsegx.data.presets)."""
    argv = [sys.executable, "-X", "importtime", *how, "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "SimpleITK")}
    assert not heavy, sorted(heavy)[:5]


def test_every_flag_explains_itself():
    """Every flag of every command has a help line, and no help line shows its default twice."""
    from medsegx.cli import COMMANDS

    for name, command in COMMANDS.items():
        parser = command.parser()
        missing = [a.option_strings or [a.dest] for a in parser._actions if not a.help and a.dest != "help"]
        assert not missing, (name, missing)
        text = parser.format_help()
        assert "(default: None)" not in text, name
        for line in text.replace("\n", " ").split("(default: ")[1:]:
            assert "(default" not in line.split(")")[0], (name, line[:80])


def test_requirements_txt_pins_every_runtime_dependency_as_constraints_txt_does():
    """The paper's `pip install -r requirements.txt` installs pyproject's dependencies at CI's versions."""
    import re

    import tomllib

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    pins = {norm(k): v for k, v in pins.items()}
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "-c constraints.txt" and lines[-1] == "."
    listed = dict(line.split("==") for line in lines[1:-1])
    assert sorted(map(norm, listed)) == sorted(norm(re.split(r"[<>=!~ ]", d)[0]) for d in deps)
    assert all(pins[norm(name)] == version for name, version in listed.items())
