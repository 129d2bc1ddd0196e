"""The one training loop and the one evaluation loop.

``train_one_epoch`` runs one epoch and returns averages; ``evaluate`` scores
every slice of a loader and returns per-slice results gathered on every rank;
``fit`` drives epochs, validation, checkpoints and logs. Pre-training and
fine-tuning differ only in their data and initial weights; internal and
external evaluation only in the slices they walk.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from . import runtime
from .checkpointer import HISTORY, TENSORBOARD, Checkpointer, DivergedError, Resume
from .fileio import atomic_write_text
from .losses import medsegx_loss
from .metrics.select import binarize, score_multimask
from .model.checkpoint import checkpoint_state
from .model.config import DEFAULT_MODEL_TYPE, default_select
from .optim import load_optimizer_state

logger = logging.getLogger(__name__)

class NonFiniteLossError(DivergedError):
    """A NaN/inf loss: carries the step and the batch's files so the run can stop loudly."""

    def __init__(self, step: int, names: Sequence[str], loss: float) -> None:
        shown = ", ".join(list(names)[:8])
        super().__init__(f"non-finite loss {loss} at step {step}; batch files: {shown}")
        self.step, self.names = step, list(names)


@dataclass
class EpochProgress:
    """How far an epoch has come: micro-batches consumed (per process) and the loss summed so far.

    Saved in mid-epoch checkpoints so that a resumed run starts at the next batch of the same
    epoch order and still reports the whole epoch's mean loss.
    """

    batches: int = 0
    loss_sum: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "loss_sum": self.loss_sum, "samples": self.samples}


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _forward(model: nn.Module, batch: dict[str, Any]):
    kwargs = {}
    if getattr(unwrap(model), "supports_prefix_cache", False):
        kwargs["cache_keys"] = [str(n) for n in batch["name"]]
    return model(batch["image"], batch["box"], batch["modal"], batch["organ"], **kwargs)


# --------------------------------------------------------------------------- training
def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    accum_steps: int = 1,
    amp: bool = False,
    amp_dtype: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    iou_loss_weight: float = 0.0,
    writer: Any = None,
    global_step: int = 0,
    progress: EpochProgress | None = None,
    on_step: Callable[[int, EpochProgress], None] | None = None,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """One epoch (or until ``max_steps`` optimiser steps in all); a step every ``accum_steps`` micro-batches.

    ``progress``: where a resumed epoch stands (the loader must already skip those batches);
    ``on_step(global_step, progress)`` runs after every optimiser step. Returns the epoch's mean
    loss over samples (reduced over ranks), the sample count and the global step.
    """
    model.train()
    config = getattr(unwrap(model), "config", None)
    loss_outputs = config.loss_outputs() if config is not None else None
    progress = EpochProgress(**progress.to_dict()) if progress is not None else EpochProgress()
    steps = 0
    batches = iter(loader)
    n_micro = len(loader) if hasattr(loader, "__len__") else None
    n_steps = math.ceil((n_micro + progress.batches) / accum_steps) if n_micro is not None else None
    bar = tqdm(total=n_steps, initial=progress.batches // accum_steps, desc=f"epoch {epoch}",
               disable=not (show_progress and runtime.is_main_process()), dynamic_ncols=True, leave=False)
    while max_steps is None or global_step < max_steps:
        group = [b for _, b in zip(range(accum_steps), batches)]
        if not group:
            break
        group_size = sum(len(b["name"]) for b in group)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, batch in enumerate(group):
            batch = _to_device(batch, device)
            last = i == len(group) - 1
            sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with runtime.autocast(device, amp, amp_dtype):
                    out = _forward(model, batch)
                loss, _ = medsegx_loss(out.masks, out.iou_pred, batch["label"], iou_loss_weight, loss_outputs)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(global_step + 1, batch["name"], float(loss))
                weighted = loss * (len(batch["name"]) / group_size)
                (scaler.scale(weighted) if scaler is not None else weighted).backward()
            step_loss += loss.item() * len(batch["name"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        global_step += 1
        steps += 1
        progress.batches += len(group)
        progress.loss_sum += step_loss
        progress.samples += group_size
        if writer is not None:
            writer.add_scalar("train/batch_loss", step_loss / group_size, global_step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
        bar.set_postfix(loss=f"{step_loss / group_size:.4f}")
        bar.update(1)
        if on_step is not None:
            on_step(global_step, progress)
    bar.close()
    loss_sum, n = runtime.all_reduce_sum([progress.loss_sum, progress.samples], device)
    return {"loss": loss_sum / max(n, 1), "samples": int(n), "steps": steps, "global_step": global_step}


# --------------------------------------------------------------------------- evaluation
class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (no padding, unlike DistributedSampler)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    amp: bool = False,
    amp_dtype: str | None = "bfloat16",
    select: str | None = None,
    metrics: Sequence[str] = ("dsc", "hd"),
    nsd_tolerance: float = 2.0,
    spacing: Callable[[int], tuple[float, float] | None] | None = None,
    keep_worst: int = 0,
    gallery: list[dict[str, Any]] | None = None,
    desc: str = "eval",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every slice: per-slice dicts (all ranks' results, in dataset order, on every rank).

    For each slice (through :func:`medsegx.metrics.score_multimask`, the one
    scorer): DSC of every output (``dsc_all``), the DSC of every selection
    mode's choice (``dsc_oracle``, ``dsc_iou``, ``dsc_first``, ... : ``modes``
    names them), the per-output scores the label-free rules read (``scores``:
    IoU head, stability, agreement), the mode ``select`` and its choice
    (``chosen``, ``dsc``), HD95 (pixels of the 256 grid, the published unit)
    of the chosen output, HD95 in mm where ``spacing(index)`` knows the pixel
    spacing, and NSD if asked. Slices with an empty label get ``skipped``.
    With ``keep_worst``, the lowest-DSC slices (image, label, prediction) are
    appended to ``gallery`` for the report's figure.
    """
    model.eval()
    if select is None:  # the backbone's default: the paper's oracle for SAM, the label-free rule for lite
        config = getattr(unwrap(model), "config", None)
        select = default_select(config.model_type if config is not None else DEFAULT_MODEL_TYPE, evaluation=True)
    results: list[dict[str, Any]] = []
    worst: list[tuple[float, dict[str, Any]]] = []
    bar = tqdm(loader, desc=desc, disable=not (show_progress and runtime.is_main_process()), dynamic_ncols=True,
               leave=False)
    for batch in bar:
        batch = _to_device(batch, device)
        with runtime.autocast(device, amp, amp_dtype):
            out = _forward(model, batch)
        logits = out.masks.float()
        masks = binarize(logits)  # sigmoid > 0.5, as published; B x K x H x W
        gt = batch["label"][:, 0].bool().cpu().numpy()
        iou_pred = out.iou_pred.float().cpu().numpy()
        indices = [int(i) for i in batch["index"]]
        # The logits, not the masks: the stability rules threshold them (the masks are binarize's, as above).
        scores = score_multimask(logits.cpu().numpy(), gt, iou_pred, select=select, metrics=metrics,
                                 nsd_tolerance=nsd_tolerance,
                                 spacing=[spacing(i) for i in indices] if spacing is not None else None)
        score_names = [key[len("score_"):] for key in scores if key.startswith("score_")]
        for j, index in enumerate(indices):
            r: dict[str, Any] = {
                "index": index,
                "name": batch["name"][j],
                "select": select,
                "dsc": float(scores["dsc"][j]),
                "chosen": int(scores["idx"][j]),
                "iou_pred": iou_pred[j].tolist(),
                "dsc_all": scores["dsc_all"][j].tolist(),
                "intersection": int(scores["intersection"][j]),
                "pred_size": int(scores["pred_size"][j]),
                "gt_size": int(scores["gt_size"][j]),
                "modes": list(scores["modes"]),
                "scores": {name: scores[f"score_{name}"][j].tolist() for name in score_names},
                **{f"dsc_{mode}": float(scores[f"dsc_{mode}"][j]) for mode in scores["modes"]},
            }
            for key, name in (("hd95", "hd"), ("hd95_mm", "hd_mm"), ("nsd", "nsd")):
                if key in scores and not np.isnan(scores[key][j]):
                    r[name] = float(scores[key][j])
            r.setdefault("hd", float("nan"))
            if r["gt_size"] == 0:
                r["skipped"] = "empty label"
            results.append(r)
            if keep_worst and r["gt_size"]:
                worst.append((r["dsc"], {"index": index, "title": f"{r['name']}  DSC {r['dsc']:.3f}",
                                         "image": batch["image"][j].permute(1, 2, 0).byte().cpu().numpy(),
                                         "label": gt[j], "pred": masks[j, r["chosen"]]}))
                worst.sort(key=lambda t: t[0])
                del worst[keep_worst:]
    gathered = runtime.all_gather_objects(results)
    merged = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    if keep_worst and gallery is not None:
        all_worst = [w for part in runtime.all_gather_objects(worst) for w in part]
        all_worst.sort(key=lambda t: t[0])
        gallery.extend(w for _, w in all_worst[:keep_worst])
    return merged


def mean_dsc(results: Sequence[dict[str, Any]], key: str = "dsc") -> float:
    values = [r[key] for r in results if "skipped" not in r]
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------- driver
@dataclass
class FitConfig:
    num_epochs: int
    output_dir: Path
    accum_steps: int = 1
    amp: bool = False
    amp_dtype: str | None = None
    iou_loss_weight: float = 0.0
    save_every: int = 0
    save_epochs: bool = False
    val_every: int = 1
    max_steps: int | None = None
    lrs: Sequence[float | None] = ()  # per parameter group, given on the command line: each replaces a resumed run's


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way (exact mid-epoch resume).

    The order of an epoch depends only on (seed, epoch), as in DistributedSampler; ``set_start(n)``
    skips the first ``n`` indices of this process's share for the current epoch only, so the
    skipped slices are never loaded.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, n: int) -> None:
        self.start = int(n)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    info = runtime.dist_info()
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, seed=seed)
    # The loader's own generator (worker seeds) keeps it off the global RNG, whose state is
    # checkpointed: creating an epoch's iterator must not shift the dropout stream of a resumed run.
    generator = torch.Generator().manual_seed(seed + info.rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, drop_last=False, generator=generator)


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    info = runtime.dist_info()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None)


def restore_training_state(resume: Resume, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                           lrs: Sequence[float | None] = ()) -> tuple[int, int, dict[str, float], EpochProgress | None]:
    """A resumed run's training state, all of it but the weights (the model was built from them): the
    optimiser (``lrs``: see :func:`~medsegx.optim.load_optimizer_state`), the scaler, this rank's RNG
    states -> (epoch, step, best so far, position in the epoch) to continue from."""
    ckpt, name = resume.state, str(resume.path)
    load_optimizer_state(optimizer, ckpt["optimizer"], name=name, lrs=lrs, step=ckpt.get("step"))
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng")
    if isinstance(rng, list):  # one state per rank
        info = runtime.dist_info()
        if len(rng) != info.world_size:
            logger.warning("%s was written by %d process(es), this run has %d: the random streams of a "
                           "resumed run differ from an uninterrupted one", name, len(rng), info.world_size)
        rng = rng[info.rank % len(rng)]
    if rng is not None:
        runtime.set_rng_state(rng)
    logger.info("resumed %s at epoch %s, step %s", name, ckpt.get("epoch"), ckpt.get("step"))
    progress = EpochProgress(**ckpt["progress"]) if ckpt.get("progress") else None
    if progress is not None and not runtime.dist_info().is_main:
        progress = EpochProgress(batches=progress.batches)  # the summed loss so far is counted once, on rank 0
    best = dict(ckpt.get("best") or {"val_dsc": -1.0, "loss": float("inf")})
    return int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0)), best, progress


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    cfg: FitConfig,
    checkpointer: Checkpointer,
    *,
    val_loader: DataLoader | None = None,
    scaler: torch.amp.GradScaler | None = None,
    resume: Resume | None = None,
    args: Any = None,
) -> dict[str, Any]:
    """Train until ``cfg.num_epochs`` epochs (or ``cfg.max_steps``), validating; ``checkpointer`` saves.

    ``resume``: the run to continue (:func:`~medsegx.checkpointer.read_resume`), whose weights the model
    already holds; the rest of its state is applied here (:func:`restore_training_state`) and the run
    continues at its next batch, in the same epoch order.
    Checkpoints: ``model_latest.pth`` every epoch (and every ``save_every`` steps),
    ``model_best.pth`` by validation DSC, ``model_lowest.pth`` by training loss,
    ``model_{epoch}.pth`` if asked.
    """
    info = runtime.dist_info()
    device = info.device
    out_dir = cfg.output_dir
    start_epoch, global_step, best, progress = 0, 0, {"val_dsc": -1.0, "loss": float("inf")}, None
    if resume is not None:
        start_epoch, global_step, best, progress = restore_training_state(resume, optimizer, scaler, cfg.lrs)
    history_path = out_dir / HISTORY
    writer = None
    if info.is_main:
        if resume:
            _truncate_history(history_path, start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its checkpoint
        writer = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=global_step + 1 if resume else None)
    args_dict = runtime.plain_args(args)

    def state(epoch: int, step: int, progress: EpochProgress | None) -> dict[str, Any]:
        """What a checkpoint holds; every rank calls it (RNG states and the partial loss are gathered)."""
        partial = None
        if progress is not None:
            loss_sum, samples = runtime.all_reduce_sum([progress.loss_sum, progress.samples], device)
            partial = {"batches": progress.batches, "loss_sum": loss_sum, "samples": int(samples)}
        rng = runtime.all_gather_objects(runtime.rng_state())
        return checkpoint_state(unwrap(model), optimizer, epoch=epoch, step=step, progress=partial,
                                scaler=scaler.state_dict() if scaler is not None else None, rng=rng,
                                best=dict(best), args=args_dict) if info.is_main else {}

    epoch_now = {"epoch": start_epoch}

    def on_step(step: int, progress: EpochProgress) -> None:
        if cfg.save_every and step % cfg.save_every == 0:
            snapshot = state(epoch_now["epoch"], step, progress)
            checkpointer.save("latest", snapshot)

    for epoch in range(start_epoch, cfg.num_epochs):
        if cfg.max_steps is not None and global_step >= cfg.max_steps:
            logger.info("reached --max_steps %d", cfg.max_steps)
            break
        epoch_now["epoch"] = epoch
        train_loader.sampler.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        if progress is not None:  # resumed part-way: skip what the interrupted run already trained on
            train_loader.sampler.set_start(progress.batches * train_loader.batch_size)
        t0 = time.time()
        try:
            stats = train_one_epoch(model, train_loader, optimizer, device=device, epoch=epoch,
                                    accum_steps=cfg.accum_steps, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                                    scaler=scaler, iou_loss_weight=cfg.iou_loss_weight, writer=writer,
                                    global_step=global_step, progress=progress, on_step=on_step,
                                    max_steps=cfg.max_steps)
        except NonFiniteLossError as err:
            raise DivergedError(f"{err}; stopped without saving: {checkpointer.describe_last_good()}") from None
        progress = None
        global_step = stats["global_step"]
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": stats["loss"], "steps": global_step,
                                  "samples": stats["samples"], "seconds": round(time.time() - t0, 2),
                                  "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.num_epochs):
            val = evaluate(model, val_loader, device=device, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                           metrics=("dsc",), desc="validate")
            record["val_dsc"] = mean_dsc(val)
            record["val_dsc_iou"] = mean_dsc(val, "dsc_iou")
        improved_val = record.get("val_dsc", -1.0) > best["val_dsc"]
        improved_loss = record["loss"] < best["loss"]
        if improved_val:
            best["val_dsc"] = record["val_dsc"]
        if improved_loss:
            best["loss"] = record["loss"]
        snapshot = state(epoch + 1, global_step, None)
        if info.is_main:
            # history first: a kill before the checkpoint re-runs the epoch, whose line is then rewritten
            with history_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            checkpointer.save("latest", snapshot)
            if improved_val:
                checkpointer.save("best", snapshot, val_dsc=record["val_dsc"])
            if improved_loss:
                checkpointer.save("lowest", snapshot, loss=record["loss"])
            if cfg.save_epochs:
                checkpointer.save("epoch", snapshot)
            writer.add_scalar("train/epoch_loss", record["loss"], epoch + 1)
            if "val_dsc" in record:
                writer.add_scalar("val/dsc", record["val_dsc"], epoch + 1)
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.num_epochs,
                        ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            cache_bytes = getattr(unwrap(model), "prefix_cache_bytes", lambda: 0)()
            if cache_bytes:
                logger.info("prefix cache: %.0f MB of frozen-prefix features held in memory", cache_bytes / 2**20)
        runtime.barrier()
    if writer is not None:
        writer.close()
    return {"best": best, "global_step": global_step}


def _truncate_history(path: Path, epochs: int) -> None:
    """Keep the history lines of the first ``epochs`` epochs (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
