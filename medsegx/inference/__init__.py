"""Prediction on a user's own scans: prompts -> per-slice boxes (prompts.py), batched forwards and
propagation (runner.py), one case in its original geometry (case.py), and :class:`Segmenter`
(segmenter.py), the one pipeline of the Python API, ``predict.py`` and ``medsegx serve``."""
from __future__ import annotations

__all__ = ["Segmenter"]


def __getattr__(name: str):
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
