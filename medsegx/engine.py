"""The one training loop and the one evaluation loop.

``train_one_epoch`` runs one epoch and returns averages; ``evaluate`` scores
every slice of a loader and returns per-slice results gathered on every rank;
``fit`` drives epochs, validation, checkpoints and logs. Pre-training and
fine-tuning differ only in their data and initial weights; internal and
external evaluation only in the slices they walk.
"""
from __future__ import annotations

import contextlib
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
from .losses import medsegx_loss
from .metrics import hd95 as hd95_metric
from .metrics import nsd as nsd_metric
from .metrics.select import SELECTION_MODES as SELECT_MODES
from .metrics.select import binarize, dice_per_mask, select_masks
from .model.checkpoint import load_medsegx_weights, save_checkpoint

logger = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss: carries the step and the batch's files so the run can stop loudly."""

    def __init__(self, step: int, names: Sequence[str], loss: float) -> None:
        shown = ", ".join(list(names)[:8])
        super().__init__(f"non-finite loss {loss} at step {step}; batch files: {shown}")
        self.step, self.names = step, list(names)


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
    on_step: Callable[[int], None] | None = None,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """One epoch (or until ``max_steps`` optimiser steps in all); a step every ``accum_steps`` micro-batches.

    Returns the epoch's mean loss over samples (reduced over ranks), the
    sample count and the global step.
    """
    model.train()
    total_loss, total_n, steps = 0.0, 0, 0
    batches = iter(loader)
    n_micro = len(loader) if hasattr(loader, "__len__") else None
    n_steps = math.ceil(n_micro / accum_steps) if n_micro else None
    bar = tqdm(total=n_steps, desc=f"epoch {epoch}", disable=not (show_progress and runtime.is_main_process()),
               dynamic_ncols=True, leave=False)
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
                loss, _ = medsegx_loss(out.masks, out.iou_pred, batch["label"], iou_loss_weight)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(global_step, batch["name"], float(loss))
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
        total_loss += step_loss
        total_n += group_size
        if writer is not None:
            writer.add_scalar("train/batch_loss", step_loss / group_size, global_step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
        bar.set_postfix(loss=f"{step_loss / group_size:.4f}")
        bar.update(1)
        if on_step is not None:
            on_step(global_step)
    bar.close()
    loss_sum, n = runtime.all_reduce_sum([total_loss, total_n], device)
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
    select: str = "oracle",
    metrics: Sequence[str] = ("dsc", "hd"),
    nsd_tolerance: float = 2.0,
    spacing: Callable[[int], tuple[float, float] | None] | None = None,
    keep_worst: int = 0,
    gallery: list[dict[str, Any]] | None = None,
    desc: str = "eval",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every slice: per-slice dicts (all ranks' results, in dataset order, on every rank).

    For each slice: DSC of the 3 outputs, the output chosen by ``select`` and
    by each honest mode, HD95 (pixels of the 256 grid, the published unit) of
    the chosen output, HD95 in mm where ``spacing(index)`` knows the pixel
    spacing, and NSD if asked. Slices with an empty label get ``skipped``.
    With ``keep_worst``, the lowest-DSC slices (image, label, prediction) are
    appended to ``gallery`` for the report's figure.
    """
    model.eval()
    results: list[dict[str, Any]] = []
    worst: list[tuple[float, dict[str, Any]]] = []
    bar = tqdm(loader, desc=desc, disable=not (show_progress and runtime.is_main_process()), dynamic_ncols=True,
               leave=False)
    for batch in bar:
        batch = _to_device(batch, device)
        with runtime.autocast(device, amp, amp_dtype):
            out = _forward(model, batch)
        masks = binarize(out.masks.float())  # sigmoid > 0.5, as published; B x 3 x H x W
        gt = batch["label"][:, 0].bool().cpu().numpy()
        iou_pred = out.iou_pred.float().cpu().numpy()
        counts = dice_per_mask(masks, gt)
        dsc_all = counts["dsc"]
        chosen = {mode: select_masks(masks, gt, iou_pred, mode) for mode in SELECT_MODES}
        sel = chosen[select]
        rows = np.arange(len(sel))
        best = masks[rows, sel]
        hd = hd95_metric(best, gt, empty="published") if "hd" in metrics else np.full(len(sel), np.nan)
        nsd = nsd_metric(best, gt, nsd_tolerance, empty="published") if "nsd" in metrics else None
        indices = [int(i) for i in batch["index"]]
        spacings = [spacing(i) if spacing is not None else None for i in indices]
        known = [j for j, sp in enumerate(spacings) if sp is not None]
        hd_mm = np.full(len(sel), np.nan)
        if known and "hd" in metrics:
            hd_mm[known] = hd95_metric(best[known], gt[known], spacing=np.array([spacings[j] for j in known]),
                                       empty="published")
        for j, index in enumerate(indices):
            r: dict[str, Any] = {
                "index": index,
                "name": batch["name"][j],
                "dsc": float(dsc_all[j, sel[j]]),
                "hd": float(hd[j]),
                "chosen": int(sel[j]),
                "iou_pred": iou_pred[j].tolist(),
                "dsc_all": dsc_all[j].tolist(),
                "intersection": int(counts["intersection"][j, sel[j]]),
                "pred_size": int(counts["pred_size"][j, sel[j]]),
                "gt_size": int(counts["gt_size"][j]),
            }
            for mode in SELECT_MODES:
                r[f"dsc_{mode}"] = float(dsc_all[j, chosen[mode][j]])
            if nsd is not None:
                r["nsd"] = float(nsd[j])
            if not np.isnan(hd_mm[j]):
                r["hd_mm"] = float(hd_mm[j])
            if r["gt_size"] == 0:
                r["skipped"] = "empty label"
            results.append(r)
            if keep_worst and r["gt_size"]:
                worst.append((r["dsc"], {"index": index, "title": f"{r['name']}  DSC {r['dsc']:.3f}",
                                         "image": batch["image"][j].permute(1, 2, 0).byte().cpu().numpy(),
                                         "label": gt[j], "pred": best[j]}))
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


def make_train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    info = runtime.dist_info()
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, drop_last=False)


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    info = runtime.dist_info()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None)


def restore_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Model, optimiser, scaler and RNG states from one of our checkpoints; returns the file's dict."""
    ckpt = load_medsegx_weights(unwrap(model), path)
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng") is not None:
        runtime.set_rng_state(ckpt["rng"])
    logger.info("resumed %s at epoch %s, step %s", path, ckpt.get("epoch"), ckpt.get("step"))
    return ckpt


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    cfg: FitConfig,
    *,
    val_loader: DataLoader | None = None,
    scaler: torch.amp.GradScaler | None = None,
    start_epoch: int = 0,
    global_step: int = 0,
    best: dict[str, float] | None = None,
    args: Any = None,
) -> dict[str, Any]:
    """Train ``cfg.num_epochs`` epochs (from ``start_epoch``), validating and checkpointing on rank 0.

    Checkpoints in ``cfg.output_dir``: ``model_latest.pth`` every epoch (and
    every ``save_every`` steps), ``model_best.pth`` by validation DSC,
    ``model_lowest.pth`` by training loss, ``model_{epoch}.pth`` if asked.
    """
    info = runtime.dist_info()
    device = info.device
    out_dir = cfg.output_dir
    best = dict(best or {"val_dsc": -1.0, "loss": float("inf")})
    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    history_path = out_dir / "history.jsonl"
    args_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if not k.startswith("_")} if args is not None else {}

    def save(name: str, epoch: int, step: int) -> None:
        if info.is_main:
            save_checkpoint(out_dir / name, unwrap(model), optimizer, epoch=epoch, step=step,
                            scaler=scaler.state_dict() if scaler is not None else None,
                            rng=runtime.rng_state(), best=best, args=args_dict)

    state = {"epoch": start_epoch}

    def on_step(step: int) -> None:
        if cfg.save_every and step % cfg.save_every == 0:
            # mid-epoch files resume at the start of their epoch (the sampler order is per epoch)
            save("model_latest.pth", state["epoch"], step)

    for epoch in range(start_epoch, cfg.num_epochs):
        if cfg.max_steps is not None and global_step >= cfg.max_steps:
            logger.info("reached --max_steps %d", cfg.max_steps)
            break
        state["epoch"] = epoch
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        t0 = time.time()
        try:
            stats = train_one_epoch(model, train_loader, optimizer, device=device, epoch=epoch,
                                    accum_steps=cfg.accum_steps, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                                    scaler=scaler, iou_loss_weight=cfg.iou_loss_weight, writer=writer,
                                    global_step=global_step, on_step=on_step, max_steps=cfg.max_steps)
        except NonFiniteLossError as err:
            save("model_latest.pth", epoch, err.step)
            logger.error("%s. Stopped; the last good state is in %s (resume with --resume)", err,
                         out_dir / "model_latest.pth")
            raise
        global_step = stats["global_step"]
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": stats["loss"], "steps": global_step,
                                  "samples": stats["samples"], "seconds": round(time.time() - t0, 2),
                                  "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.num_epochs):
            val = evaluate(model, val_loader, device=device, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                           metrics=("dsc",), desc="validate")
            record["val_dsc"] = mean_dsc(val)
            record["val_dsc_iou"] = mean_dsc(val, "dsc_iou")
        if info.is_main:
            improved_val = record.get("val_dsc", -1.0) > best["val_dsc"]
            improved_loss = record["loss"] < best["loss"]
            if improved_val:
                best["val_dsc"] = record["val_dsc"]
            if improved_loss:
                best["loss"] = record["loss"]
            save("model_latest.pth", epoch + 1, global_step)
            if improved_val:
                save("model_best.pth", epoch + 1, global_step)
            if improved_loss:
                save("model_lowest.pth", epoch + 1, global_step)
            if cfg.save_epochs:
                save(f"model_{epoch + 1}.pth", epoch + 1, global_step)
            writer.add_scalar("train/epoch_loss", record["loss"], epoch + 1)
            if "val_dsc" in record:
                writer.add_scalar("val/dsc", record["val_dsc"], epoch + 1)
            with history_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.num_epochs,
                        ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        runtime.barrier()
    if writer is not None:
        writer.close()
        plot_history(history_path, out_dir / "curves.png")
    return {"best": best, "global_step": global_step}


def plot_history(history_path: Path, out_png: Path) -> None:
    """Loss and validation DSC curves of a run, as PNG."""
    if not history_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(epochs, [r["loss"] for r in rows], marker="o")
    axes[0].set(xlabel="epoch", ylabel="training loss (Dice+BCE)", title="loss")
    val = [(r["epoch"], r["val_dsc"]) for r in rows if "val_dsc" in r]
    if val:
        axes[1].plot(*zip(*val), marker="o", color="tab:green")
    axes[1].set(xlabel="epoch", ylabel="validation DSC", title="validation DSC")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

