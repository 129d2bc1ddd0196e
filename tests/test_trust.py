"""Trust: no code runs from a checkpoint, exact resume after kills, run folders that never clobber,
diverged states never saved, errors before work and in one style, reports written whole."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model_type", "vit_tiny", "--device_ids", "--num_workers", "0", "--threads", "1"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, env=_env())


def _ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = _run(cmd)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, a last line ``error: ...`` holding every needle, and no traceback."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])
    return errors[-1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------- 1. checkpoints run no code
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A MedSegX-shaped checkpoint of the tiny model with one extra pickled object that runs a command."""
    from medsegx.model import build_model
    from medsegx.model.checkpoint import checkpoint_state

    marker = tmp_path / "code-ran"
    state = checkpoint_state(build_model("vit_tiny"))
    state["extra"] = _RunsCode(marker)
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    return path, marker


def test_unsafe_checkpoint_is_refused_in_process(evil_checkpoint):
    from medsegx.model.checkpoint import UnsafeCheckpointError, torch_load

    path, marker = evil_checkpoint
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*posix\.system"):
        torch_load(path)
    assert not marker.exists()


def test_unsafe_checkpoint_is_refused_by_every_script(evil_checkpoint, real_db, tmp_path):
    path, marker = evil_checkpoint
    commands = [
        ["evaluate_internal.py", *TINY, "--model_weight", str(path), "--data_path", str(real_db / "eval" / "ID"),
         "--output_dir", str(tmp_path / "eval")],
        ["pretrain.py", *TINY, "--resume", str(path), "--data_path", str(real_db / "train"), "--val_path", "none",
         "--work_dir", str(tmp_path / "w"), "--task_name", "p"],
        ["finetune.py", *TINY, "--resume", str(path), "--data_path", str(real_db / "eval" / "OOD"),
         "--shift_type", "cross_task", "--work_dir", str(tmp_path / "w"), "--task_name", "f"],
    ]
    for cmd in commands:
        _user_error(_run(cmd), "refusing to load", str(path), "posix.system")
    assert not marker.exists()
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.pth"))


def test_own_checkpoints_hold_only_plain_data(real_db, tmp_path):
    _ok(["pretrain.py", *TINY, "--data_path", str(real_db / "train"), "--val_path", str(real_db / "eval" / "ID"),
         "--num_epochs", "1", "--max_steps", "1", "--batch_size", "4", "--work_dir", str(tmp_path), "--task_name", "r"])
    for name in ("model_latest.pth", "model_best.pth", "model_lowest.pth"):
        ckpt = torch.load(tmp_path / "r" / name, map_location="cpu", weights_only=True)
        assert isinstance(ckpt["args"], dict) and ckpt["args"]["model_type"] == "vit_tiny"
    manifest = json.loads((tmp_path / "r" / "checkpoints.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == {"latest", "best", "lowest"}


# --------------------------------------------------------------------------- 2. exact resume after SIGKILL
def _latest_step(run: Path) -> int:
    try:
        manifest = json.loads((run / "checkpoints.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 0
    return int(manifest["files"].get("latest", {}).get("step") or 0)


def _start_and_kill(cmd: list[str], run: Path, at_step: int | None, after_s: float | None = None) -> None:
    """Start ``cmd``; SIGKILL it once its latest checkpoint reaches ``at_step`` (or after ``after_s`` s)."""
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    start = time.time()
    try:
        while proc.poll() is None and time.time() - start < 300:
            if (at_step is not None and _latest_step(run) >= at_step) or (after_s and time.time() - start > after_s):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_sigkill_and_resume_gives_the_uninterrupted_weights(real_db, tmp_path):
    """Killed several times (before the first checkpoint, between saves, mid-epoch), resumed with
    --continue each time: the same weights as one uninterrupted run, the history written once."""
    common = [*TINY, "--data_path", str(real_db / "train"), "--val_path", "none", "--max_train_slices", "24",
              "--batch_size", "4", "--num_epochs", "2", "--save_every", "1", "--lr", "2e-3",
              "--work_dir", str(tmp_path)]
    _ok(["pretrain.py", *common, "--task_name", "full"])  # 7 steps per epoch (26 slices: whole cases)
    run = tmp_path / "killed"
    resumed = ["pretrain.py", *common, "--task_name", "killed", "--continue"]
    _start_and_kill(resumed, run, at_step=None, after_s=1.0)  # during start-up
    for step in (2, 6, 9):  # mid-epoch 1, near the epoch boundary, mid-epoch 2
        _start_and_kill(resumed, run, at_step=step)
    (run / ".model_latest.pth.dead.tmp").write_bytes(b"half a checkpoint")  # a killed write
    lr_at = resumed.index("--lr")
    _ok(resumed[:lr_at] + resumed[lr_at + 2:])  # no --lr: the run keeps the checkpoint's
    assert not list(run.glob("*.tmp"))
    full, again = _weights(tmp_path / "full" / "model_latest.pth"), _weights(run / "model_latest.pth")
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=0, msg=key)
    ckpt = torch.load(run / "model_latest.pth", map_location="cpu", weights_only=True)
    reference = torch.load(tmp_path / "full" / "model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == reference["step"] and ckpt["epoch"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 2e-3
    history = [json.loads(line) for line in (run / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "full" / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # each epoch once, although killed runs wrote some
    for got, want in zip(history, expected, strict=True):
        assert (got["steps"], got["samples"]) == (want["steps"], want["samples"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)  # the whole epoch's mean, kills or not


def test_interrupted_finetune_continues(real_db, tmp_path):
    common = ["finetune.py", *TINY, "--data_path", str(real_db / "eval" / "OOD"), "--shift_type", "cross_task",
              "--num_epochs", "2", "--batch_size", "2", "--save_every", "1", "--data_ratio", "0.5", "1.0",
              "--work_dir", str(tmp_path), "--task_name", "ft"]
    out = tmp_path / "ft" / "cross_task"
    site = out / "US_FetalHead" / "HC18"
    _start_and_kill(common, site / "ratio_1", at_step=2)  # ratio 0.5 finished, ratio 1.0 under way
    first = site / "ratio_0.5" / "result.json"
    assert first.is_file() and not (site / "ratio_1" / "result.json").exists()
    kept = first.read_text(encoding="utf-8")
    _user_error(_run(common), "already holds fine-tuning results", "--continue")  # a fresh run refuses
    _ok([*common, "--continue"])
    assert first.read_text(encoding="utf-8") == kept
    rows = [line for line in (out / "summary.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| US_FetalHead")]
    assert len(rows) == 2
    assert torch.load(site / "ratio_1" / "model_latest.pth", weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- 3. run folders
def test_second_run_into_a_locked_folder_refuses(real_db, tmp_path):
    common = [*TINY, "--data_path", str(real_db / "train"), "--val_path", "none", "--batch_size", "4",
              "--work_dir", str(tmp_path), "--task_name", "shared"]
    first = subprocess.Popen([sys.executable, "pretrain.py", *common, "--num_epochs", "50"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    lock = tmp_path / "shared" / ".lock"
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text(encoding="utf-8").strip()) and time.time() < deadline:
            time.sleep(0.05)
        second = _run(["pretrain.py", *common, "--num_epochs", "1"])
        _user_error(second, "in use by another run", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert not (tmp_path / "shared" / "history.jsonl").exists() or \
        all(json.loads(line)["epoch"] >= 1 for line in (tmp_path / "shared" / "history.jsonl").read_text().splitlines())


def test_fresh_run_into_a_used_folder_refuses_unless_overwrite(real_db, tmp_path):
    common = [*TINY, "--data_path", str(real_db / "train"), "--val_path", "none", "--batch_size", "4",
              "--num_epochs", "1", "--max_steps", "1", "--work_dir", str(tmp_path), "--task_name", "run"]
    _ok(["pretrain.py", *common])
    before = (tmp_path / "run" / "model_latest.pth").read_bytes()
    _user_error(_run(["pretrain.py", *common]), "already holds a run", "--overwrite")
    assert (tmp_path / "run" / "model_latest.pth").read_bytes() == before
    (tmp_path / "run" / "model_7.pth").write_bytes(b"left by another run")
    _ok(["pretrain.py", *common, "--overwrite", "--seed", "1"])
    assert not (tmp_path / "run" / "model_7.pth").exists()  # the old run's files are gone
    assert (tmp_path / "run" / "model_latest.pth").read_bytes() != before


def test_finetune_scores_only_its_own_checkpoints(real_db, tmp_path):
    """A model_best.pth left in a ratio folder by an earlier run is never what gets scored."""
    common = ["finetune.py", *TINY, "--data_path", str(real_db / "eval" / "OOD"), "--shift_type", "cross_task",
              "--num_epochs", "1", "--batch_size", "4", "--work_dir", str(tmp_path), "--task_name", "ft",
              "--validation", "test"]
    run_dir = tmp_path / "ft" / "cross_task" / "US_FetalHead" / "HC18" / "ratio_1"
    run_dir.mkdir(parents=True)
    stale = run_dir / "model_best.pth"
    stale.write_bytes(b"an earlier run's best")
    _user_error(_run(common), "already holds", "--overwrite")
    _ok([*common, "--overwrite"])
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    chosen = Path(result["trained_checkpoint"])
    assert chosen.parent == run_dir and Path(result["checkpoint"]) == run_dir / "model_final.pth"
    manifest = json.loads((run_dir / "checkpoints.json").read_text(encoding="utf-8"))
    assert chosen.name in {entry["file"] for entry in manifest["files"].values()}
    torch.load(chosen, weights_only=True)  # this run's file, not the stale bytes


def test_a_checkpoint_to_continue_is_read_once_and_checked(tmp_path):
    """checkpointer.read_resume: a training state -> Resume; weights only -> refused (or, for pretrain's
    --resume, returned as weights); a malformed state -> one line naming the file and what is wrong."""
    from medsegx.checkpointer import Resume, RunFolderError, read_resume
    from medsegx.errors import UserError
    from medsegx.model import build_model
    from medsegx.model.checkpoint import checkpoint_state

    weights = checkpoint_state(build_model("vit_tiny"), epoch=1)
    training = {**weights, "optimizer": {"state": {}, "param_groups": []}, "rng": [{}], "step": 3,
                "progress": {"batches": 2, "loss_sum": 1.0, "samples": 8}}
    for name, obj in (("weights", weights), ("training", training),
                      ("bad_progress", {**training, "progress": {"batches": 2}}), ("bad_step", {**training, "step": -1}),
                      ("list", [1, 2])):
        torch.save(obj, tmp_path / f"{name}.pth")
    got = read_resume(tmp_path / "training.pth")
    assert isinstance(got, Resume) and got.path == tmp_path / "training.pth" and got.state["step"] == 3
    with pytest.raises(RunFolderError, match="holds weights but no training state"):
        read_resume(tmp_path / "weights.pth")
    assert not isinstance(read_resume(tmp_path / "weights.pth", weights_ok=True), Resume)
    for name, needle in (("bad_progress", "position in the epoch"), ("bad_step", "step -1"), ("list", "a list")):
        with pytest.raises(UserError, match=needle) as err:
            read_resume(tmp_path / f"{name}.pth", weights_ok=True)
        assert str(tmp_path / f"{name}.pth") in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- 4. diverged states
def test_diverged_weights_never_replace_a_good_checkpoint(tmp_path):
    from medsegx.checkpointer import Checkpointer, DivergedError
    from medsegx.model import build_model
    from medsegx.model.checkpoint import checkpoint_state

    model = build_model("vit_tiny")
    with Checkpointer(tmp_path / "run") as ck:
        ck.start()
        ck.save("latest", checkpoint_state(model, epoch=1, step=5))
        good = (tmp_path / "run" / "model_latest.pth").read_bytes()
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        with pytest.raises(DivergedError, match=r"model_latest\.pth \(epoch 1, step 5\)"):
            ck.save("latest", checkpoint_state(model, epoch=1, step=6))
    assert (tmp_path / "run" / "model_latest.pth").read_bytes() == good


def test_non_finite_loss_stops_and_names_the_last_good_file(real_db, tmp_path):
    proc = _run(["pretrain.py", *TINY, "--data_path", str(real_db / "train"), "--val_path", "none",
                 "--batch_size", "4", "--num_epochs", "1", "--save_every", "1", "--lr", "1e30",
                 "--work_dir", str(tmp_path), "--task_name", "nan"])
    line = _user_error(proc, "non-finite", "model_latest.pth")
    assert "last good state" in line
    ckpt = torch.load(tmp_path / "nan" / "model_latest.pth", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values())


# --------------------------------------------------------------------------- 5/6. errors before work, one style
@pytest.mark.parametrize("script, argv, flag", [
    ("finetune", ["--shift_type", "cross_task", "--data_ratio", "0.5", "1.5"], "--data_ratio"),
    ("pretrain", ["--val_every", "0"], "--val_every"),
    ("pretrain", ["--micro_batch_size", "-1"], "--micro_batch_size"),
    ("pretrain", ["--micro_batch_size", "0"], "--micro_batch_size"),
    ("pretrain", ["--max_train_slices", "0"], "--max_train_slices"),
    ("pretrain", ["--save_every", "-1"], "--save_every"),
    ("pretrain", ["--num_epochs", "0"], "--num_epochs"),
    ("pretrain", ["--lr", "nan"], "--lr"),
    ("pretrain", ["--batch_size", "4", "--micro_batch_size", "8"], "--micro_batch_size"),
    ("pretrain", ["--continue", "--overwrite"], "--overwrite"),
    ("internal", ["--data_path", "x", "--gallery", "-2"], "--gallery"),
])
def test_bad_arguments_are_argparse_errors(script, argv, flag, capsys):
    from medsegx.args import eval_parser, train_parser

    parser = eval_parser("e", external=False) if script == "internal" else train_parser("t", finetune=script == "finetune")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_user_errors_before_any_model_is_built(tmp_path, real_db):
    empty = tmp_path / "empty" / "train"
    (empty / "Scans" / "PET_Liver" / "npy_imgs").mkdir(parents=True)
    (empty / "Scans" / "PET_Liver" / "npy_gts").mkdir(parents=True)
    np.save(empty / "Scans" / "PET_Liver" / "npy_imgs" / "a.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(empty / "Scans" / "PET_Liver" / "npy_gts" / "a.npy", np.ones((8, 8), np.uint8))
    only_junk = tmp_path / "junk" / "train"
    only_junk.mkdir(parents=True)
    (only_junk / ".DS_Store").write_bytes(b"\0")
    for data in (empty, only_junk):
        proc = _run(["pretrain.py", *TINY, "--data_path", str(data), "--val_path", "none",
                     "--work_dir", str(tmp_path / "w"), "--task_name", data.parent.name])
        _user_error(proc, "no usable training slice", str(data))
        assert not list((tmp_path / "w").rglob("*.pth"))
    _user_error(_run(["pretrain.py", *TINY, "--checkpoint", str(tmp_path / "missing.pth"), "--data_path",
                      str(real_db / "train"), "--val_path", "none", "--work_dir", str(tmp_path / "w")]),
                "missing.pth", "does not exist")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _run(["evaluate_internal.py", *TINY, "--data_path", str(real_db / "eval" / "ID"),
                 "--output_dir", str(blocker / "reports")])
    _user_error(proc, "cannot write to the report folder", str(blocker))
    assert "evaluating" not in proc.stdout.lower() and "ID:" not in proc.stderr
    debug = _run(["evaluate_internal.py", *TINY, "--data_path", str(tmp_path / "nowhere"), "--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --------------------------------------------------------------------------- 7. whole reports, full disks
def test_report_set_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from medsegx import reports

    rows = [reports.SliceResult(f"DS/CT_Liver/casenum_{i}_sliceid_0.npy", dsc=0.5 + i / 10, hd=2.0) for i in range(3)]
    gallery = [{"title": "x", "image": np.zeros((8, 8)), "label": np.ones((8, 8)), "pred": np.ones((8, 8))}]
    paths = reports.write_report(rows, tmp_path, "ID", "internal evaluation", gallery=gallery)
    before = {p: p.read_bytes() for p in paths.values()}
    rows[0].dsc = 0.01

    def broken_gallery(samples, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reports, "plot_gallery", broken_gallery)
    with pytest.raises(OSError):
        reports.write_report(rows, tmp_path, "ID", "internal evaluation", gallery=gallery)
    assert {p: p.read_bytes() for p in paths.values()} == before  # the previous complete set
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_is_named(tmp_path, monkeypatch):
    from medsegx import fileio
    from medsegx.errors import NoSpaceError
    from medsegx.model.checkpoint import atomic_save

    target = tmp_path / "model_latest.pth"
    target.write_bytes(b"previous")

    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError, match=f"no space left on {tmp_path}"):
        fileio.atomic_write(target, full)

    def torch_write_failed(obj, handle):  # what torch's serializer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_write_failed)
    monkeypatch.setattr(fileio, "_disk_nearly_full", lambda folder: True)
    with pytest.raises(NoSpaceError, match="no space left on"):
        atomic_save({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == b"previous" and not list(tmp_path.glob("*.tmp"))
