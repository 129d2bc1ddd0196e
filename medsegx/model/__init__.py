"""MedSegX networks: SAM (or LiteMedSAM) at 256 with ConMoAE adapters, and their checkpoints.

Modules: ``config`` (hyper-parameters and model names; no torch), ``build`` (the registry and the
one builder), ``freeze`` (what trains), ``medsegx`` (the SAM-based network), ``lite`` (the
LiteMedSAM one), ``conmoae`` (the adapters), ``fast`` (exact fast attention), ``checkpoint`` (file
I/O), ``sam_package`` (segment-anything's modules without its predictor). The names below are imported on first use.
"""
from __future__ import annotations

import importlib

from .config import MODEL_TYPES, ModelConfig, model_config
from .sam_package import defer_package_init

defer_package_init()  # segment_anything.modeling without the predictor's torchvision (sam_package.py)

_LAZY = {
    "MODEL_REGISTRY": "build", "build_model": "build", "build_sam256": "build",
    "apply_freeze_policy": "freeze", "check_all_trainable_used": "freeze", "count_parameters": "freeze",
    "CheckpointError": "checkpoint", "load_medsegx_weights": "checkpoint", "load_sam_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "ConMoAE": "conmoae", "MedSegX": "medsegx", "MedSegXOutput": "medsegx",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_TYPES", "ModelConfig", "model_config", *_LAZY]
