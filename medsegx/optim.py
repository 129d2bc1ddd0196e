"""A training run's optimiser: AdamW over the trainable parameters in named groups, the L2-SP pull of the
mask decoder toward its starting weights, and the optimiser's part of a resumed run's state."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .args import default_lr
from .errors import UserError

logger = logging.getLogger(__name__)


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
    named = [(n, p) for n, p in getattr(model, "module", model).named_parameters() if p.requires_grad]
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
    if any("anchor" in g for g in groups):  # a resume must match (load_optimizer_state checks), so this holds after it too
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


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], *, name: str,
                         lrs: Sequence[float | None] = (), step: Any = None) -> None:
    """A resumed run's optimiser state (moments, learning rates, L2-SP anchors) into this run's ``optimizer``.

    The groups must be this run's (their number and L2-SP strengths; else a :class:`UserError` naming
    ``name``, the checkpoint). A learning rate of ``lrs`` (given on the command line, per group) that differs
    from the checkpoint's replaces it from ``step`` on, with a warning.
    """
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise UserError(f"{name} was written with {len(groups)} optimiser parameter group(s), this run has "
                        f"{len(optimizer.param_groups)} (--freeze_decoder / --decoder_lr differ): resume with "
                        "the run's own flags")
    saved_l2sp = [g.get("l2sp", 0.0) for g in groups]
    wanted_l2sp = [g.get("l2sp", 0.0) for g in optimizer.param_groups]
    if saved_l2sp != wanted_l2sp:
        raise UserError(f"{name} was written with L2-SP strengths {saved_l2sp} per parameter group, this "
                        f"run asks for {wanted_l2sp} (--l2sp differs): resume with the run's own flags")
    optimizer.load_state_dict(saved)
    for group, wanted in zip(optimizer.param_groups, lrs, strict=bool(lrs)):
        if wanted is not None and wanted != group["lr"]:
            logger.warning("%s lr %g replaces the checkpoint's %g from step %s on: the run is no longer "
                           "the uninterrupted one", group["name"], wanted, group["lr"], step)
            group["lr"] = wanted
