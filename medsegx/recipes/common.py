"""What every recipe shares: the model built from the command line (one place for all entry points)
and one training run into a locked run folder (the loop itself is :func:`medsegx.engine.fit`)."""
from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import runtime
from ..args import default_lr, model_hparams
from ..checkpointer import Checkpointer
from ..data.dataset import MedSegDataset
from ..data.layout import EVAL, ID
from ..engine import FitConfig, fit, make_eval_loader, make_train_loader, restore_training_state, unwrap
from ..errors import UserError
from ..model.build import build_model
from ..model.freeze import check_all_trainable_used, count_parameters

logger = logging.getLogger(__name__)


def batch_plan(global_batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro batch per forward, accumulation steps) so that ranks x accum x micro == the global batch."""
    if global_batch < world_size:
        raise ValueError(f"--batch_size {global_batch} is smaller than the {world_size} processes")
    per_rank = global_batch // world_size
    if per_rank * world_size != global_batch:
        logger.warning("--batch_size %d is not a multiple of %d processes: using %d per process",
                       global_batch, world_size, per_rank)
    accum = math.ceil(per_rank / micro_batch) if micro_batch else 1
    micro = math.ceil(per_rank / accum)
    if micro * accum != per_rank:
        logger.warning("%d per process does not split into %d equal micro-batches: %d x %d used",
                       per_rank, accum, accum, micro)
    return micro, accum


def model_from_args(args: argparse.Namespace, device: torch.device,
               init_weights: str | Path | Mapping[str, Any] | None = None,
               *, for_training: bool = True) -> nn.Module:
    """The run's model on ``device``; ``for_training=False`` (scoring only) skips the trainable-parameter
    check, a forward and backward pass that only training (DDP) needs."""
    model = build_model(args.model_type, checkpoint=args.checkpoint, model_weight=init_weights,
                        fast=not args.no_fast, train_iou_head=getattr(args, "iou_loss_weight", 0.0) > 0,
                        train_decoder=not getattr(args, "freeze_decoder", False),
                        train_encoder_adapters=not getattr(args, "freeze_encoder_adapters", False),
                        **model_hparams(args))
    cfg = model.config
    if getattr(args, "freeze_encoder_adapters", False) and not (cfg.decoder_adapters or cfg.task_decoder
                                                                  or not getattr(args, "freeze_decoder", False)):
        raise UserError("--freeze_encoder_adapters with --freeze_decoder leaves nothing to train: add "
                        "--task_decoder or --decoder_adapters (or drop a flag)")
    if for_training:
        unused = check_all_trainable_used(model)
        if unused:  # DDP would hang or fail on them; say which
            raise RuntimeError(f"trainable parameters without gradient: {unused[:10]}")
        counts = count_parameters(model)
        logger.info("model %s: %s trainable of %s parameters (%s)", args.model_type, f"{counts['trainable']:,}",
                    f"{counts['total']:,}", ", ".join(f"{k} {v:,}" for k, v in counts.items()
                                                       if k not in ("trainable", "total", "frozen")))
    model.to(device)
    disk = getattr(args, "prefix_cache_dir", None)
    if (getattr(args, "prefix_cache", False) or disk) and hasattr(model, "enable_prefix_cache"):
        # training keeps every slice in memory across epochs; an evaluation sees each slice once
        model.enable_prefix_cache(max_items=None if for_training else 0, disk_dir=disk)
        kept = (["in memory"] if for_training else []) + ([f"in {disk} for every later run"] if disk else [])
        logger.info("prefix cache on: the frozen layers before the first adapter run once per slice, "
                    "%.1f MB per slice kept %s", model.prefix_cache_bytes_per_item() / 2**20, " and ".join(kept))
    elif disk:
        logger.warning("--prefix_cache_dir: %s has no frozen-prefix cache (lite only); ignored", args.model_type)
    if args.compile:
        model = torch.compile(model)
    return model


def train_run(
    args: argparse.Namespace,
    train_data: Any,
    val_data: Any | None,
    output_dir: Path,
    init_weights: str | Path | Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
    resume_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train on ``train_data`` records (validating on ``val_data``) into the run folder ``output_dir``.

    ``init_weights``: MedSegX weights to start from (a file or a loaded checkpoint). ``resume``:
    one of our checkpoints to continue exactly (model, optimiser, scaler, epoch, step, position in
    the epoch, RNG); ``resume_state``: that file already loaded. The run folder is locked for the run's lifetime and a fresh run refuses to
    replace another run's files unless ``args.overwrite`` (see :class:`~medsegx.checkpointer.Checkpointer`).
    Returns fit's result plus ``files``: the checkpoints this run wrote, by kind.
    """
    info = runtime.dist_info()
    device = info.device
    if not len(train_data):
        raise UserError(f"no training slice for {output_dir}")
    micro, accum = batch_plan(args.batch_size, info.world_size, args.micro_batch_size)
    checkpointer = Checkpointer(output_dir, is_main=info.is_main, overwrite=getattr(args, "overwrite", False),
                                resume=resume, resume_state=resume_state)
    with checkpointer:
        state = checkpointer.start()
        runtime.barrier()
        runtime.write_run_info(args, output_dir, resumed_from=str(resume) if resume else None)
        runtime.add_log_file(output_dir)
        logger.info("global batch %d = %d process(es) x %d accumulation step(s) x %d", args.batch_size,
                    info.world_size, accum, micro)
        # a resumed run rebuilds the model its checkpoint describes
        model = model_from_args(args, device, state if state is not None else init_weights)
        if hasattr(model, "task_decoder"):  # the tasks of this training set are decoded by the task decoder
            tasks = torch.tensor(sorted({int(r.organ[-1]) for r in train_data}), dtype=torch.int64)
            model.task_decoder.mark_trained(tasks)
            logger.info("task decoder: %d task(s) of this training set decoded by it, %d in all", len(tasks),
                        int(model.task_decoder.trained_tasks.sum()))
        optimizer = make_optimizer(model, args)
        use_scaler = args.use_amp and device.type == "cuda" and \
            runtime.resolve_amp_dtype(device, args.amp_dtype) == torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        if state is not None:
            groups = state.get("optimizer", {}).get("param_groups", [])
            if len(groups) != len(optimizer.param_groups):
                raise UserError(f"{resume} was written with {len(groups)} optimiser parameter group(s), this run has "
                                f"{len(optimizer.param_groups)} (--freeze_decoder / --decoder_lr differ): resume with "
                                "the run's own flags")
            saved_l2sp = [g.get("l2sp", 0.0) for g in groups]
            wanted_l2sp = [g.get("l2sp", 0.0) for g in optimizer.param_groups]
            if saved_l2sp != wanted_l2sp:
                raise UserError(f"{resume} was written with L2-SP strengths {saved_l2sp} per parameter group, this "
                                f"run asks for {wanted_l2sp} (--l2sp differs): resume with the run's own flags")
            restore_training_state(state, model, optimizer, scaler, name=str(resume))
            for group, wanted in zip(optimizer.param_groups, group_lrs(args), strict=True):
                if wanted is not None and wanted != group["lr"]:
                    logger.warning("%s lr %g replaces the checkpoint's %g from step %s on: the run is no longer "
                                   "the uninterrupted one", group["name"], wanted, group["lr"], state.get("step"))
                    group["lr"] = wanted
        if info.distributed:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        train_set = MedSegDataset(train_data, train=True, jitter=args.box_jitter, seed=args.seed, strict=args.strict)
        logger.info("training boxes: the tight box grown by 0..%d px per side", args.box_jitter)
        train_loader = make_train_loader(train_set, micro, args.num_workers, args.seed)
        val_loader = None
        if val_data is not None and len(val_data):
            val_set = MedSegDataset(val_data, train=False, seed=args.seed, strict=args.strict)
            val_loader = make_eval_loader(val_set, args.val_batch_size or micro, args.num_workers)
        cfg = FitConfig(num_epochs=args.num_epochs, output_dir=output_dir, accum_steps=accum, amp=args.use_amp,
                        amp_dtype=args.amp_dtype, iou_loss_weight=args.iou_loss_weight,
                        save_every=args.save_every, save_epochs=args.save_epochs, val_every=args.val_every,
                        max_steps=args.max_steps)
        start_epoch = int(state.get("epoch", 0)) if state else 0
        logger.info("training on %d slices, validating on %d, epochs %d..%d", len(train_set),
                    len(val_loader.dataset) if val_loader else 0, start_epoch + 1, args.num_epochs)
        result = fit(model, optimizer, train_loader, cfg, checkpointer, val_loader=val_loader, scaler=scaler,
                     resume=state, args=args)
        result["files"] = {kind: checkpointer.path(kind) for kind in ("latest", "best", "lowest")}
    return result


def resolve_val_path(data_path: str | Path, val_path: str | None) -> Path | None:
    """--val_path: 'none' -> no validation; given -> that folder; default -> eval/ID beside train/."""
    if val_path is not None:
        return None if val_path.lower() == "none" else Path(val_path)
    root = Path(data_path)
    return next((c for c in (root / EVAL / ID, root.parent / EVAL / ID) if c.is_dir()), None)


def group_lrs(args: argparse.Namespace) -> list[float | None]:
    """The learning rates given on the command line for each parameter group (None: not given)."""
    lrs = [args.lr]
    if not getattr(args, "freeze_decoder", False):
        lrs.append(getattr(args, "decoder_lr", None) or args.lr)
    return lrs


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the adapters and context embeddings at --lr, the mask decoder at
    --decoder_lr (default --lr) unless --freeze_decoder."""
    lr = args.lr if args.lr is not None else default_lr(args.finetune)
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    groups = [{"name": "adapters", "params": [p for n, p in named if not n.startswith("mask_decoder.")], "lr": lr}]
    decoder = [p for n, p in named if n.startswith("mask_decoder.")]
    if decoder:
        group = {"name": "decoder", "params": decoder, "lr": getattr(args, "decoder_lr", None) or lr}
        strength = getattr(args, "l2sp", 0.0) or 0.0
        if strength > 0:
            # L2-SP: the decoder decays toward its starting weights instead of toward zero; the anchor
            # travels in the optimiser's state dict, so a resumed run keeps the original start
            group.update(weight_decay=0.0, l2sp=strength, anchor=[p.detach().clone() for p in decoder])
        groups.append(group)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)
    if any("anchor" in g for g in groups):  # a resume must match (train_run checks), so this holds after it too
        optimizer.register_step_post_hook(_pull_toward_anchor)
    return optimizer


@torch.no_grad()
def _pull_toward_anchor(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """After each step, parameters of an L2-SP group move toward their anchor by lr * l2sp of the gap
    (decoupled like AdamW's weight decay: p <- p - lr * l2sp * (p - p0))."""
    for group in optimizer.param_groups:
        strength = group.get("l2sp", 0.0)
        if strength:
            weight = group["lr"] * strength
            anchors = group["anchor"]
            for i, (param, anchor) in enumerate(zip(group["params"], anchors, strict=True)):
                if anchor.device != param.device:  # loaded from a checkpoint on the CPU: moved once
                    anchors[i] = anchor.to(param.device)
                param.lerp_(anchors[i], weight)
