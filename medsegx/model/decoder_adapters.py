"""Context-gated adapters in SAM's mask decoder (beyond the paper; ``ModelConfig.decoder_adapters``).

The paper's ConMoAE conditions only the image encoder: the mask decoder is shared by every task and sees no
context, so whatever it learns for one task it applies to every box (docs/GENERALISATION.md). Here each of
the decoder transformer's layers gets two mixtures of E bottleneck experts, one beside the token MLP and one
on the image stream after the image-to-token attention:

    queries <- norm3(q + mlp(q) + scale * sum_e g_e * up_e(act(down_e(q))))
    keys    <- n + scale * sum_e g_e * up_e(act(down_e(n))),   n = norm4(...)

and the expert weights are *linear in the direction of the slice's task embedding*, with no bias:
``g = W t / (|t| + eps)``, ``t`` the task row of the encoder's context table (``image_encoder.organ_embed[4]``). Every table row starts at zero
and a row that no training slice looks up gets no gradient, so for a task no training saw, for an unknown
task and for the neutral context, ``t = 0``, ``g = 0`` and the decoder is exactly the backbone's, bit for
bit, whatever the adapters learned for the trained tasks. (The experts' own weights start random, not at
zero, so the task rows of the trained tasks get a gradient from the first step.)

Nothing of segment-anything is edited or copied: the adapters are attached with forward hooks on the
stock ``TwoWayAttentionBlock``'s ``mlp`` and ``norm4``, so the decoder's own parameter names (and every
checkpoint of it) stay the backbone's; the adapters' keys are ``decoder_adapters.*``. The slice context
reaches the hooks for one decoder call through :meth:`DecoderAdapters.context`.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.taxonomy import UNKNOWN_TASK
from .conmoae import NUM_ORGAN_LEVELS, lookup_rows

# The gate reads t / (|t| + GATE_EPS): smooth, exactly 0 at t = 0, the unit direction once |t| >> GATE_EPS
# (after a few optimiser steps at lr 1e-3).
GATE_EPS = 1e-3


class TaskGatedExperts(nn.Module):
    """E bottleneck experts mixed by ``W @ t / (|t| + eps)`` for the task row ``t`` (a zero row: zero output)."""

    def __init__(self, dim: int, embed_dim: int, bottleneck_dim: int, num_experts: int, dropout: float,
                 scale: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.adapter_down = nn.Linear(dim, num_experts * bottleneck_dim)
        self.adapter_up = nn.Linear(num_experts * bottleneck_dim, dim, bias=False)
        self.adapter_gate = nn.Linear(embed_dim, num_experts, bias=False)
        self.adapter_dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``x``: ``B x N x C``; ``task``: ``B x D`` -> ``B x N x C`` (exactly 0 where a task row is 0)."""
        # No bias, and the row's direction: 0 for a zero row, O(1) as soon as training moves it (a row grows
        # by ~lr per step under Adam, so a gate linear in the row would stay ~0 for a short run).
        direction = task / (task.norm(dim=-1, keepdim=True) + GATE_EPS)
        gate = self.adapter_gate(direction)  # B x E
        h = self.adapter_dropout(F.gelu(self.adapter_down(x)))
        batch, tokens, width = h.shape
        h = (h.view(batch, tokens, self.num_experts, width // self.num_experts) * gate[:, None, :, None].to(h.dtype))
        return self.scale * self.adapter_up(h.flatten(2))


class DecoderAdapters(nn.Module):
    """The adapters of every layer of a mask decoder's ``TwoWayTransformer``, attached by hooks."""

    def __init__(self, decoder: nn.Module, embed_dim: int, bottleneck_dim: int, num_experts: int,
                 dropout: float, scale: float) -> None:
        super().__init__()
        layers = list(decoder.transformer.layers)
        dim = decoder.transformer_dim

        def experts() -> TaskGatedExperts:
            return TaskGatedExperts(dim, embed_dim, bottleneck_dim, num_experts, dropout, scale)

        self.tokens = nn.ModuleList(experts() for _ in layers)
        self.image = nn.ModuleList(experts() for _ in layers)
        self._task: torch.Tensor | None = None
        # Hooks hold no reference to this module's tensors between calls (see context()).
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_hook(self._token_hook(i))
            layer.norm4.register_forward_hook(self._image_hook(i))

    def _token_hook(self, i: int):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._task is None:
                return output
            return output + self.tokens[i](inputs[0], self._task)
        return hook

    def _image_hook(self, i: int):
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._task is None:
                return output
            return output + self.image[i](output, self._task)
        return hook

    @staticmethod
    def task_rows(organ_embed: nn.ModuleList, organ: torch.Tensor, batch: int) -> torch.Tensor:
        """The task rows ``batch x D`` of ``organ`` (``B x 4`` [body part, subregion, organ, task]; one row
        is repeated for ``batch`` boxes on one slice); ``NEUTRAL_ROW`` gives zero."""
        if organ.dim() != 2 or organ.shape[1] != NUM_ORGAN_LEVELS or organ.shape[0] not in (1, batch):
            raise ValueError(f"organ must be 1 x {NUM_ORGAN_LEVELS} or {batch} x {NUM_ORGAN_LEVELS} for {batch} boxes, "
                             f"got {tuple(organ.shape)}")
        task = lookup_rows(organ_embed[NUM_ORGAN_LEVELS], organ[:, NUM_ORGAN_LEVELS - 1])
        return task.expand(batch, -1) if task.shape[0] != batch else task

    @contextlib.contextmanager
    def context(self, task: torch.Tensor) -> Iterator[None]:
        """Within the block, the hooked decoder runs with these task rows (``B x D``, one per box)."""
        self._task = task
        try:
            yield
        finally:
            self._task = None


def attach_decoder_adapters(model: nn.Module, cfg) -> None:
    """Give ``model`` (MedSegX or LiteMedSegX) the context decoder parts its config asks for: the decoder
    adapters (``decoder_adapters``) and the task decoder (``task_decoder``)."""
    if cfg.task_decoder:
        outputs = cfg.loss_outputs()
        model.task_decoder = TaskDecoder(model.mask_decoder, cfg.level_sizes[NUM_ORGAN_LEVELS],
                                         single_output=outputs[0] if len(outputs) == 1 else None)
    if cfg.decoder_adapters:
        model.decoder_adapters = DecoderAdapters(
            model.mask_decoder, embed_dim=cfg.adapter_embed_dim, bottleneck_dim=cfg.adapter_bottleneck,
            num_experts=cfg.num_experts, dropout=cfg.adapter_dropout, scale=cfg.adapter_scale)


def decoder_context(model: nn.Module, organ: torch.Tensor | None, batch: int):
    """The context a decoder call of ``model`` runs in: its adapters fed the task rows of ``organ``, or
    nothing for a model without decoder adapters."""
    adapters = getattr(model, "decoder_adapters", None)
    if adapters is None:
        return contextlib.nullcontext()
    if organ is None:
        raise ValueError("this model has context-gated decoder adapters: decode() needs the slices' organ "
                         "indices (B x 4)")
    return adapters.context(adapters.task_rows(model.image_encoder.organ_embed, organ.to(
        model.image_encoder.organ_embed[0].weight.device), batch))


class TaskDecoder(nn.Module):
    """A mask decoder of its own for the tasks pre-training saw (``ModelConfig.task_decoder``; beyond the paper).

    ``decoder`` starts as a copy of the backbone's mask decoder and trains; the backbone's stays frozen.
    ``trained_tasks`` (a buffer, saved in checkpoints) marks the task rows of the training set
    (:meth:`mark_trained`, called by the training run before its first step). A slice whose task is marked is
    decoded by this decoder and offered only the output(s) the loss trained (``single_output``: LiteMedSAM's
    token 0, repeated in every output slot, so no label-free rule can swap in an output training never
    touched); any other slice (a task no training saw, the unknown task, the neutral context) by the
    backbone's decoder, exactly, with all its candidates. The gate is the task itself: what the decoder
    learns for four tasks cannot reach a fifth.
    """

    def __init__(self, mask_decoder: nn.Module, num_tasks: int, single_output: int | None) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(mask_decoder)
        self.register_buffer("trained_tasks", torch.zeros(num_tasks, dtype=torch.bool))
        self.single_output = single_output

    @torch.no_grad()
    def start_from(self, mask_decoder: nn.Module) -> None:
        """Copy the backbone decoder's weights (after the builder loaded them)."""
        self.decoder.load_state_dict(mask_decoder.state_dict())

    @torch.no_grad()
    def mark_trained(self, tasks: torch.Tensor, unknown: bool = False) -> None:
        """Mark the task rows ``tasks`` (indices) as trained. ``NEUTRAL_ROW`` entries are ignored, and so is the
        spare unknown-task row unless ``unknown``: it stands for every task the taxonomy does not name, which a
        pre-training set cannot speak for; a fine-tune on one site's unnamed task may (``finetune.py``)."""
        keep = (tasks >= 0) if unknown else (tasks >= 0) & (tasks != UNKNOWN_TASK)
        tasks = tasks[keep].to(self.trained_tasks.device)
        self.trained_tasks[tasks] = True

    def decodes(self, tasks: torch.Tensor) -> torch.Tensor:
        """Which of the task rows ``tasks`` (indices, ``NEUTRAL_ROW`` allowed) are marked trained."""
        tasks = tasks.to(self.trained_tasks.device)
        return self.trained_tasks[tasks.clamp(min=0)] & (tasks >= 0)

    def known(self, organ: torch.Tensor, batch: int) -> torch.Tensor:
        """``batch`` booleans: which boxes' tasks are marked trained."""
        known = self.decodes(organ[:, NUM_ORGAN_LEVELS - 1])
        return known.expand(batch) if known.shape[0] != batch else known


def run_routed_decoder(model: nn.Module, run, organ: torch.Tensor | None, batch: int):
    """``run(decoder) -> (masks, iou)`` on the model's mask decoder, or, for a model with a task decoder, on
    each box's decoder (:class:`TaskDecoder`): the backbone's for tasks no training saw, the task decoder
    (its trained output only) for the others. ``run`` takes a decoder and the indices of the boxes (None: all)."""
    routed = getattr(model, "task_decoder", None)
    if routed is None:
        return run(model.mask_decoder, None)
    if organ is None:  # without a trained task every box is the backbone's, whatever its context
        if bool(routed.trained_tasks.any()):
            raise ValueError("this model's task decoder has trained tasks: decode() needs the slices' organ "
                             "indices (B x 4)")
        return run(model.mask_decoder, None)
    known = routed.known(organ, batch)
    if torch.compiler.is_exporting():  # a graph (ONNX): both decoders, then per box the one its task takes
        masks_k, iou_k = trained_outputs(model, run, routed, None)
        masks_o, iou_o = run(model.mask_decoder, None)
        return (torch.where(known.view(-1, 1, 1, 1), masks_k, masks_o), torch.where(known.view(-1, 1), iou_k, iou_o))
    if not bool(known.any()):
        return run(model.mask_decoder, None)

    if bool(known.all()):
        return trained_outputs(model, run, routed, None)
    idx_known, idx_other = known.nonzero().flatten(), (~known).nonzero().flatten()
    masks_k, iou_k = trained_outputs(model, run, routed, idx_known)
    masks_o, iou_o = run(model.mask_decoder, idx_other)
    masks = masks_k.new_empty((batch, *masks_k.shape[1:]))
    iou = iou_k.new_empty((batch, *iou_k.shape[1:]))
    masks[idx_known], masks[idx_other] = masks_k, masks_o
    iou[idx_known], iou[idx_other] = iou_k, iou_o
    return masks, iou


def trained_outputs(model: nn.Module, run, routed: TaskDecoder, index):
    """The task decoder's outputs for boxes ``index``: only the trained one(s), repeated in every slot."""
    masks, iou = run(routed.decoder, index)
    if routed.single_output is not None:
        j, k = routed.single_output, masks.shape[1]
        masks, iou = masks[:, j:j + 1].expand(-1, k, -1, -1), iou[:, j:j + 1].expand(-1, k)
    return masks, iou
