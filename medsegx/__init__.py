"""MedSegX: SAM / LiteMedSAM with ConMoAE adapters for open-world medical image segmentation.

``from medsegx import Segmenter`` is the notebook API (imported on first use, so ``import medsegx``
stays light).
"""
from __future__ import annotations

__all__ = ["Segmenter"]


def __getattr__(name: str):
    if name == "Segmenter":
        from .inference.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
