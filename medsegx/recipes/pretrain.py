"""Pre-training (pretrain.py, ``medsegx pretrain``): ConMoAE and the mask decoder on MedSegDB's train/."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .. import runtime
from ..checkpointer import LATEST, Resume, read_resume
from ..data.catalog import find_split_roots, open_catalog, problem_summary
from ..data.layout import TRAIN
from ..errors import UserError
from .common import resolve_val_path, train_run

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """pretrain.py: MedSegDB's train/ split (validated on eval/ID beside it, or --val_path) into
    <work_dir>/<task_name>, from scratch, from MedSegX weights, or continuing a run."""
    output_dir = Path(args.work_dir) / args.task_name
    runtime.setup(args, None)
    train = open_catalog(args.data_path, splits=training_splits(args.data_path), strict=args.strict,
                         refresh=args.refresh_index)
    if not len(train):
        raise UserError(f"no usable training slice under {args.data_path}{problem_summary(train)}")
    if args.max_train_slices and len(train) > args.max_train_slices:
        train = train.subset(args.max_train_slices / len(train), seed=args.seed)
    val_path = resolve_val_path(args.data_path, args.val_path)
    val = open_catalog(val_path, strict=args.strict, refresh=args.refresh_index) if val_path else None
    if val is not None and not len(val):
        raise UserError(f"no usable validation slice under {val_path}{problem_summary(val)} "
                        "(--val_path none trains without validation)")
    resume, init = None, None
    if args.resume_run:
        latest = output_dir / LATEST
        resume = latest if latest.is_file() else None  # read by the run's checkpointer
        logger.info("--continue: %s", f"resuming {latest}" if resume else f"no {LATEST} yet, starting fresh")
    elif args.resume:  # a run to continue, or weights to start from: read once, here
        start = read_resume(args.resume, weights_ok=True)
        resume, init = (start, None) if isinstance(start, Resume) else (None, start)
    result = train_run(args, train, val, output_dir, init_weights=init, resume=resume)
    runtime.cleanup_distributed()
    return result


def training_splits(data_path: str | Path) -> list[str] | None:
    """The splits to train on: MedSegDB's train/ when the path holds one, else the folder itself (a tree of
    Dataset/Modality_Task/.. or Modality_Task/Dataset/../finetune|inference folders under any name)."""
    roots = find_split_roots(data_path)
    if any(root.split == TRAIN for root in roots):
        return [TRAIN]
    logger.info("no train/ split in %s: training on the slices of %s", data_path,
                ", ".join(str(root.path) for root in roots))
    return None
