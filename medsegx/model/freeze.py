"""The one freeze policy: what trains (adapters, context embeddings, mask decoder) and what is frozen."""
from __future__ import annotations

import torch
from torch import nn

# ``organ_embed.{4}``: the task level of the context tables (conmoae.ContextEmbedding), which also gates
# the decoder adapters (decoder_adapters.py).
TASK_TABLE = 4
# The task decoder's weights and its buffer of trained tasks (decoder_adapters.TaskDecoder).
TASK_DECODER_PREFIX = "task_decoder."


def is_trainable_name(name: str, train_iou_head: bool = False, train_decoder: bool = True,
                      train_encoder_adapters: bool = True, train_task_table: bool = True,
                      has_task_decoder: bool = False) -> bool:
    """The freeze policy: adapters, context embeddings and the mask decoder train; nothing else.

    The IoU head trains only when it has a loss (``--iou_loss_weight > 0``): an
    unused trainable parameter breaks DDP. ``train_decoder=False`` (``--freeze_decoder``)
    trains the adapters and context embeddings alone (the IoU head still trains if asked).
    ``train_encoder_adapters=False`` (``--freeze_encoder_adapters``) fixes the image encoder, its ConMoAE
    included (the models run it without autograd, :func:`encoder_trains`): the decoder adapters learn, and
    of the context tables the task table, which gates them (``train_task_table``: the model has decoder
    adapters); the tables only the encoder reads stay. The task decoder (``task_decoder.*``) always trains,
    its IoU head when it has a loss; a model with one (``has_task_decoder``) keeps the backbone's decoder
    fixed, whatever ``train_decoder`` says: it is what every task that no training saw is decoded by.
    """
    if name.startswith(TASK_DECODER_PREFIX):
        return train_iou_head or ".iou_prediction_head." not in name
    if name.startswith("mask_decoder.") and has_task_decoder:
        return False
    if name.startswith("mask_decoder.iou_prediction_head."):
        return train_iou_head
    if name.startswith("mask_decoder."):
        return train_decoder
    if not train_encoder_adapters and name.startswith("image_encoder."):
        return train_task_table and name.startswith(f"image_encoder.organ_embed.{TASK_TABLE}.")
    return "adapter" in name or ".modal_embed." in name or ".organ_embed." in name


def encoder_trains(model: nn.Module) -> bool:
    """Whether any adapter of the image encoder trains; when none does, the encoder is a fixed function of
    the image and the context and runs without autograd (``--freeze_encoder_adapters``)."""
    return any(p.requires_grad for n, p in model.image_encoder.named_parameters() if "adapter" in n)


def apply_freeze_policy(model: nn.Module, train_iou_head: bool = False, train_decoder: bool = True,
                        train_encoder_adapters: bool = True) -> None:
    task_table = bool(getattr(getattr(model, "config", None), "decoder_adapters", False))
    task_decoder = hasattr(model, "task_decoder")
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable_name(name, train_iou_head, train_decoder, train_encoder_adapters,
                                               task_table, task_decoder))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part, and the totals."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if name.startswith("mask_decoder."):
            part = "mask_decoder"
        elif name.startswith(TASK_DECODER_PREFIX):
            part = "task_decoder"
        elif "adapter" in name:
            part = "adapters"
        elif "embed." in name and ("modal_embed" in name or "organ_embed" in name):
            part = "context_embeddings"
        else:
            part = "frozen_backbone"
        key = part if param.requires_grad else "frozen"
        counts[key] = counts.get(key, 0) + param.numel()
    counts["trainable"] = sum(v for k, v in counts.items() if k != "frozen")
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def check_all_trainable_used(model: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward (DDP needs none)."""
    model.zero_grad(set_to_none=True)
    size = model.config.img_size
    image = torch.rand(2, 3, size, size, device=device) * 255
    box = torch.tensor([[30.0, 40.0, 150.0, 160.0], [10.0, 20.0, 100.0, 200.0]], device=device)
    modal = torch.tensor([2, 7], device=device)
    organ = torch.tensor([[1, 4, 17, 59], [1, 5, 27, 82]], device=device)
    routed = getattr(model, "task_decoder", None)
    if routed is not None:  # the probe's first task as a trained one, so the task decoder is reached too
        saved = routed.trained_tasks.clone()
        routed.trained_tasks[organ[0, -1]] = True
    try:
        out = model(image, box, modal, organ)
    finally:
        if routed is not None:
            routed.trained_tasks.copy_(saved)
    loss = out.masks.float().mean()
    if any(p.requires_grad for n, p in model.named_parameters() if "iou_prediction_head" in n):
        loss = loss + out.iou_pred.float().mean()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused
