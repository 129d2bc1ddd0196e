"""Training objective (paper): Dice + BCE per multimask output, the minimum over the 3 outputs.

A model whose outputs include tokens it is not trained on (``mask_outputs="all"``: every token a
candidate for the label-free choice) takes the minimum over its trained outputs only
(``ModelConfig.loss_outputs``); the IoU-head loss, where asked, covers every output.

Dice is MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)`` (squared
denominator), BCE is with logits, both per sample and per output; the loss of
a sample is that of its best output (the box is ambiguous, the outputs are
three hypotheses), averaged over the batch.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@functools.cache
def _dice_loss():
    # MONAI is imported on first use: evaluation never needs it and its import costs seconds.
    from monai.losses import DiceLoss

    return DiceLoss(sigmoid=True, squared_pred=True, reduction="none")


def per_output_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE of each output: logits ``B x K x H x W``, target ``B x 1 x H x W`` -> ``B x K``."""
    logits = logits.float()
    target = target.to(logits.dtype).expand_as(logits)
    dice = _dice_loss()(logits, target).flatten(1)  # B x K
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
    return dice + bce


def iou_of_masks(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded output with the label, ``B x K`` (the IoU head's target)."""
    pred = logits > 0
    gt = target.bool().expand_as(pred)
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    return inter / union.clamp_min(1)


def medsegx_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, iou_loss_weight: float = 0.0,
    outputs: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss and the per-sample losses (``B``, for logging bad batches).

    ``outputs``: the outputs the minimum runs over (default all). ``iou_loss_weight > 0`` adds an MSE
    between the IoU head and the true IoU of each output, which the honest ``--select iou`` mode relies on.
    """
    everything = outputs is None or tuple(outputs) == tuple(range(logits.shape[1]))
    trained = logits if everything else logits[:, list(outputs)]
    per_sample = per_output_loss(trained, target).min(dim=1).values
    loss = per_sample.mean()
    if iou_loss_weight > 0:
        loss = loss + iou_loss_weight * F.mse_loss(iou_pred.float(), iou_of_masks(logits.detach(), target))
    return loss, per_sample.detach()
