"""MedSegX networks: SAM (or LiteMedSAM) at 256 with ConMoAE adapters, and their checkpoints."""
from .build import (
    MODEL_CONFIGS,
    ModelConfig,
    apply_freeze_policy,
    build_model,
    build_sam256,
    check_all_trainable_used,
    count_parameters,
    model_config,
    set_fast,
)
from .checkpoint import CheckpointError, load_medsegx_weights, load_sam_checkpoint, save_checkpoint
from .conmoae import ConMoAE
from .sam256 import MedSegX, MedSegXOutput

MODEL_TYPES = (*MODEL_CONFIGS, "lite")

__all__ = [
    "MODEL_CONFIGS", "MODEL_TYPES", "CheckpointError", "ConMoAE", "MedSegX", "MedSegXOutput", "ModelConfig",
    "apply_freeze_policy", "build_model", "build_sam256", "check_all_trainable_used", "count_parameters",
    "load_medsegx_weights", "load_sam_checkpoint", "model_config", "save_checkpoint", "set_fast",
]
