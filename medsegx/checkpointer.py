"""A training run's folder: its lock, its checkpoints and the rules for starting or continuing it.

One :class:`Checkpointer` per run folder (``<work_dir>/<task_name>``, or one fine-tuning site and
data ratio) owns everything that can go wrong between runs:

- a lock (``.lock``, ``flock``: released by the kernel when the process dies, so a killed run
  never leaves a stale lock): a second run into the same folder refuses, naming the holder;
- the start rules: a fresh run into a folder that holds another run's checkpoints or history
  refuses unless ``overwrite`` (the old run's files are then removed) or a resume;
- ``model_latest.pth`` / ``model_best.pth`` / ``model_lowest.pth`` / ``model_<epoch>.pth``, each
  written atomically by rank 0 only, never with non-finite weights (a diverged state never
  replaces a good one);
- ``checkpoints.json``: which file holds what (epoch, step, metric) for this run, so scoring
  reads only the files of the run that wrote them;
- temporaries of a write that was killed are removed on start;
- the one read of a checkpoint to continue (:func:`read_resume`): loaded safely and checked once, a
  :class:`Resume` that the model builder (weights) and :func:`medsegx.engine.fit` (everything else) apply.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fileio import atomic_write_text, ensure_writable_dir, remove_stale_temps
from .model.checkpoint import CheckpointError, atomic_save, torch_load

try:  # POSIX; elsewhere runs are not locked (said once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

LATEST, BEST, LOWEST = "model_latest.pth", "model_best.pth", "model_lowest.pth"
MANIFEST = "checkpoints.json"
LOCK_FILE = ".lock"
# The other files of a run folder: the engine's history, curves and TensorBoard events, finetune's scores.
HISTORY, CURVES, TENSORBOARD, RESULT = "history.jsonl", "curves.png", "tensorboard", "result.json"
# What makes a folder "hold a run" (and what --overwrite removes).
RUN_OUTPUTS = (LATEST, BEST, LOWEST, MANIFEST, HISTORY, CURVES, TENSORBOARD, RESULT)


class RunFolderError(UserError):
    """The run folder is locked by another run, or holds a run that this one would overwrite."""


class DivergedError(UserError):
    """Training produced a non-finite loss or non-finite weights."""


class RunLock:
    """An exclusive advisory lock on a folder, with who holds it written inside."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        if fcntl is None:
            logger.warning("run folders cannot be locked on this platform: do not start two runs into %s",
                           self.path.parent)
            return
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                 "end or choose another --work_dir/--task_name") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the flock
            self._handle = None


def holds_run(folder: Path) -> list[str]:
    """The run outputs present in ``folder`` (empty: nothing a new run would clobber)."""
    if not folder.is_dir():
        return []
    present = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    present += sorted(p.name for p in folder.glob("model_*.pth") if p.name not in present)
    return present


def all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


class Checkpointer:
    """Owns one run folder (see module doc). Every rank builds one; only rank 0 touches files.

    Args:
        folder: the run folder.
        is_main: rank 0 (writes, locks); other ranks only read the resume state.
        overwrite: a fresh run may replace the run found in ``folder``.
        resume: a checkpoint of ours to continue from (in ``folder`` or elsewhere): its path (read by
            :meth:`start`) or already read by :func:`read_resume`; ``None`` starts fresh.
    """

    def __init__(self, folder: str | Path, *, is_main: bool = True, overwrite: bool = False,
                 resume: Resume | str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.is_main = is_main
        self.overwrite = overwrite
        self._resume = resume
        self.run_id = uuid.uuid4().hex
        self.files: dict[str, dict[str, Any]] = {}
        self._lock = RunLock(self.folder)

    # ------------------------------------------------------------------ start and end
    def start(self) -> Resume | None:
        """Lock the folder, apply the start rules, clean up -> the run to continue (read and checked) or None."""
        resume = self._resume
        if resume is not None and not isinstance(resume, Resume):
            resume = read_resume(resume)
        if not self.is_main:
            return resume
        ensure_writable_dir(self.folder, "run folder")
        self._lock.acquire()
        try:
            removed = remove_stale_temps(self.folder)
            if removed:
                logger.info("removed %d unfinished temporary file(s) of a killed write in %s", len(removed),
                            self.folder)
            continuing_here = resume is not None and resume.path.resolve().parent == self.folder.resolve()
            present = holds_run(self.folder)
            if present and not continuing_here:
                if not self.overwrite:
                    raise RunFolderError(
                        f"{self.folder} already holds a run ({', '.join(present[:5])}); continue it with "
                        f"--resume {self.folder / LATEST} (or --continue), or replace it with --overwrite")
                self._remove_run_outputs(present)
            if resume is not None:
                self.run_id = str(resume.state.get("run_id") or self.run_id)
                if continuing_here:
                    self.files = self._read_manifest()
        except BaseException:
            self._lock.release()
            raise
        return resume

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_run_outputs(self, present: list[str]) -> None:
        logger.warning("--overwrite: removing the previous run's %s from %s", ", ".join(present), self.folder)
        for name in present:
            path = self.folder / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the manifest
    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        if manifest.get("run_id") != self.run_id:
            return {}
        return {k: v for k, v in manifest.get("files", {}).items() if (self.folder / v["file"]).is_file()}

    def _write_manifest(self) -> None:
        atomic_write_text(self.folder / MANIFEST, json.dumps({"run_id": self.run_id, "files": self.files},
                                                             indent=1) + "\n")

    def path(self, kind: str) -> Path | None:
        """The file this run wrote for ``kind`` ("latest", "best", "lowest"), or None."""
        entry = self.files.get(kind)
        return self.folder / entry["file"] if entry else None

    def describe_last_good(self) -> str:
        latest = self.files.get("latest")
        if latest is None:
            return "no checkpoint was written yet"
        return f"the last good state is {self.folder / latest['file']} (epoch {latest['epoch']}, step {latest['step']})"

    # ------------------------------------------------------------------ saving
    def save(self, kind: str, state: dict[str, Any], **info: Any) -> Path | None:
        """Write ``state`` as the ``kind`` checkpoint ("latest", "best", "lowest" or "epoch").

        Rank 0 only (others return None). Non-finite weights are never written: that raises
        :class:`DivergedError`, naming the last good file.
        """
        if not self.is_main:
            return None
        if not all_finite(state["model"]):
            raise DivergedError(f"the weights became non-finite at step {state.get('step')}; not saved over "
                                f"{self.folder}: {self.describe_last_good()}")
        name = {"latest": LATEST, "best": BEST, "lowest": LOWEST}.get(kind) or f"model_{state['epoch']}.pth"
        state = {**state, "run_id": self.run_id}
        atomic_save(state, self.folder / name)
        self.files[kind if kind != "epoch" else name] = {"file": name, "epoch": state.get("epoch"),
                                                         "step": state.get("step"), **info}
        self._write_manifest()
        return self.folder / name


def is_training_state(ckpt: Mapping[str, Any]) -> bool:
    """A checkpoint written mid-run by this project (continuable exactly), not just weights."""
    return isinstance(ckpt, Mapping) and ckpt.get("rng") is not None and ckpt.get("optimizer") is not None


@dataclass(frozen=True)
class Resume:
    """A run to continue exactly: the checkpoint's path and its state, read and checked by :func:`read_resume`."""

    path: Path
    state: dict[str, Any]


_PROGRESS_KEYS = {"batches", "loss_sum", "samples"}


def _resume_problem(state: Mapping[str, Any]) -> str | None:
    """What makes a training state impossible to continue, or None."""
    model = state.get("model")
    if not isinstance(model, Mapping) or not all(torch.is_tensor(v) for v in model.values()):
        return "has no dict of tensors under 'model'"
    if not isinstance(state["optimizer"], Mapping) or not isinstance(state["optimizer"].get("param_groups"), list):
        return "holds an optimiser state without parameter groups"
    for key in ("epoch", "step"):
        value = state.get(key, 0)
        if not isinstance(value, int) or value < 0:
            return f"holds {key} {value!r}, not a count"
    progress = state.get("progress")
    if progress is not None and not (isinstance(progress, Mapping) and set(progress) == _PROGRESS_KEYS):
        return f"holds a position in the epoch ('progress') without {', '.join(sorted(_PROGRESS_KEYS))}"
    return None


def read_resume(path: str | Path, *, weights_ok: bool = False) -> Resume | dict[str, Any]:
    """The one read of a checkpoint to continue: loaded safely (plain data only, see
    :func:`~medsegx.model.checkpoint.torch_load`) and checked, each problem a one-line :class:`UserError`
    naming the file.

    A file of weights without a training state (optimiser, RNG) cannot be continued; ``weights_ok``
    returns it as a plain dict instead (pretrain's --resume starts from such a file).
    """
    path = Path(path)
    state = torch_load(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint of this project: it holds a {type(state).__name__}, "
                             "not a dict")
    if not is_training_state(state):
        if weights_ok:
            return dict(state)
        raise RunFolderError(f"{path} holds weights but no training state (optimiser, RNG): it "
                             "cannot be continued; start from it as initial weights instead")
    problem = _resume_problem(state)
    if problem:
        raise CheckpointError(f"{path} cannot be continued: it {problem}")
    return Resume(path, dict(state))
