"""Overlap metrics: Dice similarity coefficient (DSC) per batch item.

Empty-mask policy (``empty=``), for an item whose label ``gt`` is empty:

=============  ====================  =====================
policy         gt empty, pred empty  gt empty, pred not
=============  ====================  =====================
``"nan"``      NaN                   NaN
``"score"``    1.0                   0.0
=============  ====================  =====================

``"nan"`` (the default) is MONAI's ``compute_dice(ignore_empty=True)``, which the published
MedSegX evaluation used (``DiceMetric()`` defaults). ``"score"`` is MONAI's ``ignore_empty=False``. An empty prediction with a non-empty label always scores 0.
A NaN is meant to be counted and reported by the caller, never averaged silently.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._inputs import as_pair

logger = logging.getLogger(__name__)

DICE_POLICIES = ("nan", "score")


def count_true(m: np.ndarray) -> np.ndarray:
    """Number of True values per batch item of a bool array ``B x ...`` -> int64 ``B``."""
    flat = m.reshape(m.shape[0], int(np.prod(m.shape[1:])))
    n = flat.shape[1]
    # Eight bools are one 64-bit word of 0x00/0x01 bytes: a popcount counts them ~10x faster
    # than count_nonzero along an axis.
    if hasattr(np, "bitwise_count") and n % 8 == 0 and flat.flags.c_contiguous:
        return np.bitwise_count(flat.view(np.uint64)).sum(axis=1, dtype=np.int64)
    return np.count_nonzero(flat, axis=1).astype(np.int64)


def overlap_counts(pred: Any, gt: Any, spatial_dims: int | None = None) -> dict[str, np.ndarray]:
    """Per item ``intersection``, ``pred_size`` and ``gt_size`` (int64 ``B``).

    Summing these over the slices of a case gives that case's volumetric DSC.
    """
    p, g = as_pair(pred, gt, spatial_dims=spatial_dims)
    return {"intersection": count_true(p & g), "pred_size": count_true(p), "gt_size": count_true(g)}


def dice_from_counts(intersection: np.ndarray, pred_size: np.ndarray, gt_size: np.ndarray,
                     empty: str = "nan") -> np.ndarray:
    """DSC = 2|P∩G| / (|P| + |G|) from counts (arrays of any matching shape) -> float64."""
    if empty not in DICE_POLICIES:
        raise ValueError(f"empty must be one of {DICE_POLICIES}, got {empty!r}")
    inter = np.asarray(intersection, dtype=np.float64)
    ps = np.asarray(pred_size, dtype=np.float64)
    gs = np.asarray(gt_size, dtype=np.float64)
    denom = ps + gs
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, 2.0 * inter / np.where(denom > 0, denom, 1.0), np.nan)
    empty_gt = gs == 0
    if np.any(empty_gt):
        logger.debug("dice: %d item(s) with an empty label (policy %r)", int(np.sum(empty_gt)), empty)
        if empty == "score":
            out = np.where(empty_gt, np.where(ps == 0, 1.0, 0.0), out)
        else:
            out = np.where(empty_gt, np.nan, out)
    return np.asarray(out, dtype=np.float64)


def dice(pred: Any, gt: Any, empty: str = "nan", spatial_dims: int | None = None) -> np.ndarray:
    """Dice similarity coefficient per item.

    Args:
        pred, gt: binary masks ``B x [1 x] H x W`` or ``B x [1 x] D x H x W`` (numpy or torch).
        empty: policy for an empty label, see the module docstring (default: NaN, as MONAI and the published code).
        spatial_dims: 3 to read ``B x 1 x H x W`` as volumes of depth 1 (rarely needed).

    Returns:
        float64 array ``B``.
    """
    c = overlap_counts(pred, gt, spatial_dims=spatial_dims)
    return dice_from_counts(c["intersection"], c["pred_size"], c["gt_size"], empty=empty)
