"""Choosing one of the model's multimask outputs, and scoring the choice.

MedSegX predicts K = 3 masks per prompt. The published evaluation keeps the one with the best
DSC against the label ("oracle": it uses the label, ties go to the first) and reports that
mask's HD95. Two honest choices that do not look at the label are offered beside it so the gap
can be reported: "iou" (the model's own IoU prediction, ties to the first) and "first"
(output 0, SAM's single-mask token).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._inputs import SpacingLike, as_mask_batch, to_numpy
from .dice import count_true, dice_from_counts
from .surface import hd95, nsd

SELECTION_MODES = ("oracle", "iou", "first")


def binarize(masks_or_logits: Any) -> np.ndarray:
    """Bool masks from bool / 0-1 integer masks or float logits (``sigmoid(x) > 0.5``).

    Float input is always read as logits; the sigmoid runs in torch in the input's dtype, as
    the published evaluation did, so values within float rounding of 0 threshold alike.
    (0/1 float masks survive this: sigmoid(1) > 0.5, sigmoid(0) = 0.5 is not.)
    """
    x = masks_or_logits
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return (torch.sigmoid(x) > 0.5).detach().cpu().numpy()
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating):
        return (torch.sigmoid(torch.from_numpy(np.ascontiguousarray(a))) > 0.5).numpy()
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.size and not np.array_equal(a != 0, a == 1):
            raise ValueError("integer masks must hold only 0 and 1")
        return a != 0
    raise ValueError(f"expected bool masks or float logits, got dtype {a.dtype}")


def _multimask(masks_or_logits: Any) -> np.ndarray:
    m = binarize(masks_or_logits)
    if m.ndim != 4:
        raise ValueError(f"multimask outputs must be B x K x H x W, got shape {m.shape}")
    return np.ascontiguousarray(m)


def _first_argmax(values: np.ndarray) -> np.ndarray:
    """Row-wise argmax, ties to the first, NaN never preferred (an all-NaN row gives 0)."""
    v = np.where(np.isnan(values), -np.inf, values)
    return np.argmax(v, axis=1).astype(np.int64)


def dice_per_mask(masks: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Counts and DSC of each of K masks ``B x K x H x W`` (bool) against ``gt`` ``B x H x W``.

    Returns ``intersection``, ``pred_size`` (int64 ``B x K``), ``gt_size`` (``B``), ``dsc`` (``B x K``,
    NaN where the label is empty).
    """
    b, k = masks.shape[:2]
    per_mask = (b * k,) + masks.shape[2:]
    inter = count_true((masks & gt[:, None]).reshape(per_mask)).reshape(b, k)
    psize = count_true(masks.reshape(per_mask)).reshape(b, k)
    gsize = count_true(gt)
    return {"intersection": inter, "pred_size": psize, "gt_size": gsize,
            "dsc": dice_from_counts(inter, psize, gsize[:, None], empty="monai")}


def select_masks(masks_or_logits: Any, gt: Any = None, iou_pred: Any = None, mode: str = "oracle") -> np.ndarray:
    """Index of the chosen output per item -> int64 ``B``.

    Args:
        masks_or_logits: ``B x K x H x W`` bool masks or float logits (see :func:`binarize`).
        gt: label ``B x [1 x] H x W`` (needed for "oracle").
        iou_pred: predicted IoU ``B x K`` (needed for "iou").
        mode: "oracle" (best DSC against the label, ties and empty labels -> the first),
            "iou" (highest predicted IoU, ties -> the first) or "first" (always 0).
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    shape = np.shape(masks_or_logits)
    if len(shape) != 4:
        raise ValueError(f"multimask outputs must be B x K x H x W, got shape {tuple(shape)}")
    if mode == "first":
        return np.zeros(shape[0], np.int64)
    if mode == "iou":
        if iou_pred is None:
            raise ValueError("mode 'iou' needs iou_pred (B x K)")
        iou = to_numpy(iou_pred).astype(np.float64)
        if iou.shape != tuple(shape[:2]):
            raise ValueError(f"iou_pred must be {tuple(shape[:2])}, got {iou.shape}")
        return _first_argmax(iou)
    if gt is None:
        raise ValueError("mode 'oracle' needs the label gt")
    m = _multimask(masks_or_logits)
    g = as_mask_batch(gt, "gt", 2)
    if g.shape != (m.shape[0],) + m.shape[2:]:
        raise ValueError(f"gt must be B x [1 x] H x W matching {m.shape}, got {np.shape(gt)}")
    return _first_argmax(dice_per_mask(m, g)["dsc"])


def score_multimask(masks_or_logits: Any, gt: Any, iou_pred: Any = None, spacing: SpacingLike = None,
                    nsd_tolerance: float | None = None, empty: str = "published") -> dict[str, np.ndarray]:
    """The published per-slice scores plus the honest-selection ones, for one batch.

    Args:
        masks_or_logits: ``B x K x H x W`` bool masks or float logits.
        gt: label ``B x [1 x] H x W``.
        iou_pred: predicted IoU ``B x K``; adds ``idx_iou`` / ``dsc_iou``.
        spacing: pixel spacing (scalar, per axis, or ``B x 2``); adds ``hd95_mm`` (HD95 of the
            oracle mask in the spacing's unit; ``hd95`` itself stays in pixels as published).
        nsd_tolerance: adds ``nsd`` of the oracle mask at this tolerance (in the spacing's unit
            when spacing is given, else pixels).
        empty: empty-mask policy of the surface metrics (default: the published one).

    Returns:
        dict of arrays ``B``: ``idx`` (oracle choice), ``dsc``, ``hd95`` (pixels), ``dsc_first``,
        ``intersection`` / ``pred_size`` / ``gt_size`` of the oracle mask (for volumetric DSC),
        ``empty_label`` (bool), and ``dsc_all`` ``B x K``; plus the optional entries above.
    """
    m = _multimask(masks_or_logits)
    g = as_mask_batch(gt, "gt", 2)
    if g.shape != (m.shape[0],) + m.shape[2:]:
        raise ValueError(f"gt must be B x [1 x] H x W matching {m.shape}, got {np.shape(gt)}")
    b = m.shape[0]
    rows = np.arange(b)
    counts = dice_per_mask(m, g)
    dsc_all = counts["dsc"]
    idx = _first_argmax(dsc_all)
    chosen = m[rows, idx]
    out = {
        "idx": idx,
        "dsc": dsc_all[rows, idx],
        "hd95": hd95(chosen, g, empty=empty),
        "dsc_first": dsc_all[:, 0],
        "intersection": counts["intersection"][rows, idx],
        "pred_size": counts["pred_size"][rows, idx],
        "gt_size": counts["gt_size"],
        "empty_label": counts["gt_size"] == 0,
        "dsc_all": dsc_all,
    }
    if iou_pred is not None:
        idx_iou = select_masks(m, iou_pred=iou_pred, mode="iou")
        out["idx_iou"] = idx_iou
        out["dsc_iou"] = dsc_all[rows, idx_iou]
    if spacing is not None:
        out["hd95_mm"] = hd95(chosen, g, spacing=spacing, empty=empty)
    if nsd_tolerance is not None:
        out["nsd"] = nsd(chosen, g, nsd_tolerance, spacing=spacing, empty=empty)
    return out
