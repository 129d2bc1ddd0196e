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
from ..args import model_hparams
from ..checkpointer import CURVES, HISTORY, Checkpointer, Resume
from ..data.dataset import MedSegDataset
from ..data.layout import EVAL, ID
from ..engine import FitConfig, fit, make_eval_loader, make_train_loader
from ..errors import UserError
from ..model.build import build_model
from ..model.freeze import check_all_trainable_used, count_parameters
from ..optim import group_lrs, make_optimizer
from ..reports import plot_history

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


def mark_training_tasks(model: nn.Module, train_data: Any, finetune: bool = False) -> bool:
    """Mark the training set's tasks in the model's task decoder (if it has one): those slices are decoded by
    it (a fine-tune's unnamed task too: the unknown-task row, see
    :meth:`~medsegx.model.decoder_adapters.TaskDecoder.mark_trained`). Returns
    whether some slices are not (the neutral context; the unknown task in pre-training), so that a batch may
    leave its parameters without gradient; when no slice is, the task decoder does not train."""
    routed = getattr(model, "task_decoder", None)
    if routed is None:
        return False
    tasks = torch.tensor(sorted({int(r.organ[-1]) for r in train_data}), dtype=torch.int64)
    routed.mark_trained(tasks, unknown=finetune)
    decoded = routed.decodes(tasks)
    logger.info("task decoder: %d of this training set's %d task(s) decoded by it, %d in all", int(decoded.sum()),
                len(tasks), int(routed.trained_tasks.sum()))
    if bool(decoded.any()):
        return not bool(decoded.all())
    for param in routed.parameters():
        param.requires_grad_(False)
    logger.warning("task decoder: no task of this training set has a row of its own (the neutral context or the "
                   "unknown task are decoded by the backbone's decoder): it stays as it is")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("nothing to train: this training set's tasks have no row of their own (neutral context or "
                        "unknown task), so the task decoder does not learn them, and --freeze_encoder_adapters fixes "
                        "the encoder; drop --freeze_encoder_adapters, or name the slices' task as the taxonomy does")
    return False


def train_run(
    args: argparse.Namespace,
    train_data: Any,
    val_data: Any | None,
    output_dir: Path,
    init_weights: str | Path | Mapping[str, Any] | None = None,
    resume: Resume | str | Path | None = None,
) -> dict[str, Any]:
    """Train on ``train_data`` records (validating on ``val_data``) into the run folder ``output_dir``.

    ``init_weights``: MedSegX weights to start from (a file or a loaded checkpoint). ``resume``:
    one of our checkpoints to continue exactly (model, optimiser, scaler, epoch, step, position in
    the epoch, RNG), its path or already read (:func:`~medsegx.checkpointer.read_resume`): the
    checkpointer reads it once, the model is built from its weights, ``fit`` applies the rest. The run
    folder is locked for the run's lifetime and a fresh run refuses to replace another run's files
    unless ``args.overwrite`` (see :class:`~medsegx.checkpointer.Checkpointer`).
    Returns fit's result plus ``files``: the checkpoints this run wrote, by kind.
    """
    info = runtime.dist_info()
    device = info.device
    if not len(train_data):
        raise UserError(f"no training slice for {output_dir}")
    micro, accum = batch_plan(args.batch_size, info.world_size, args.micro_batch_size)
    checkpointer = Checkpointer(output_dir, is_main=info.is_main, overwrite=getattr(args, "overwrite", False),
                                resume=resume)
    with checkpointer:
        resume = checkpointer.start()
        runtime.barrier()
        runtime.write_run_info(args, output_dir, resumed_from=str(resume.path) if resume else None)
        runtime.add_log_file(output_dir)
        logger.info("global batch %d = %d process(es) x %d accumulation step(s) x %d", args.batch_size,
                    info.world_size, accum, micro)
        # a resumed run rebuilds the model its checkpoint describes, with its weights
        model = model_from_args(args, device, resume.state if resume is not None else init_weights)
        mixed_routes = mark_training_tasks(model, train_data, finetune=bool(getattr(args, "finetune", False)))
        optimizer = make_optimizer(model, args)
        use_scaler = args.use_amp and device.type == "cuda" and \
            runtime.resolve_amp_dtype(device, args.amp_dtype) == torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        if info.distributed:
            # a batch of only neutral or unknown-task slices leaves the task decoder without gradient
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=mixed_routes)

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
                        max_steps=args.max_steps, lrs=group_lrs(args))
        start_epoch = int(resume.state.get("epoch", 0)) if resume else 0
        logger.info("training on %d slices, validating on %d, epochs %d..%d", len(train_set),
                    len(val_loader.dataset) if val_loader else 0, start_epoch + 1, args.num_epochs)
        result = fit(model, optimizer, train_loader, cfg, checkpointer, val_loader=val_loader, scaler=scaler,
                     resume=resume, args=args)
        if info.is_main:
            plot_history(output_dir / HISTORY, output_dir / CURVES)
        result["files"] = {kind: checkpointer.path(kind) for kind in ("latest", "best", "lowest")}
    return result


def resolve_val_path(data_path: str | Path, val_path: str | None) -> Path | None:
    """--val_path: 'none' -> no validation; given -> that folder; default -> eval/ID beside train/."""
    if val_path is not None:
        return None if val_path.lower() == "none" else Path(val_path)
    root = Path(data_path)
    return next((c for c in (root / EVAL / ID, root.parent / EVAL / ID) if c.is_dir()), None)
