"""Choosing one of the model's multimask outputs, and scoring the choice.

MedSegX predicts K = 3 masks per prompt. The published evaluation keeps the one with the best
DSC against the label ("oracle": it uses the label, ties go to the first) and reports that
mask's HD95. Two honest choices that do not look at the label are offered beside it so the gap
can be reported: "iou" (the model's own IoU prediction, ties to the first) and "first"
(output 0, SAM's single-mask token).
"""
from __future__ import annotations

from collections.abc import Sequence
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
            "dsc": dice_from_counts(inter, psize, gsize[:, None], empty="nan")}


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


def score_multimask(masks_or_logits: Any, gt: Any, iou_pred: Any = None, *, select: str = "oracle",
                    metrics: Sequence[str] = ("dsc", "hd"), spacing: Sequence[SpacingLike | None] | SpacingLike = None,
                    nsd_tolerance: float = 2.0, empty: str = "published") -> dict[str, np.ndarray]:
    """The one scorer of multimask outputs: every selection mode's choice and DSC, and the surface
    metrics of the output ``select`` chose.

    Args:
        masks_or_logits: ``B x K x H x W`` bool masks or float logits.
        gt: label ``B x [1 x] H x W``.
        iou_pred: predicted IoU ``B x K``; without it the "iou" mode is absent.
        select: the mode whose output is scored by HD95 / NSD and reported as ``dsc`` / ``idx``
            ("oracle" is the published protocol).
        metrics: "hd" adds ``hd95`` (pixels, as published); "nsd" adds ``nsd``.
        spacing: pixel spacing: one for all items, or one per item (None where unknown); adds
            ``hd95_mm`` (NaN where unknown) when "hd" is asked. NSD's tolerance is in the spacing's
            unit where the spacing is known for all items, else in pixels.
        empty: empty-mask policy of the surface metrics (default: the published one).

    Returns:
        dict of arrays ``B``: ``dsc_all`` (``B x K``); per mode ``idx_<mode>`` and ``dsc_<mode>``;
        ``select`` (the mode), ``idx`` and ``dsc`` (its choice), ``intersection`` / ``pred_size`` /
        ``gt_size`` of the chosen output (for volumetric DSC), ``empty_label`` (bool), and the
        surface metrics above.
    """
    m = _multimask(masks_or_logits)
    g = as_mask_batch(gt, "gt", 2)
    if g.shape != (m.shape[0],) + m.shape[2:]:
        raise ValueError(f"gt must be B x [1 x] H x W matching {m.shape}, got {np.shape(gt)}")
    modes = [mode for mode in SELECTION_MODES if mode != "iou" or iou_pred is not None]
    if select not in modes:
        raise ValueError(f"select must be one of {modes}, got {select!r}")
    b = m.shape[0]
    rows = np.arange(b)
    counts = dice_per_mask(m, g)
    dsc_all = counts["dsc"]
    out: dict[str, Any] = {"dsc_all": dsc_all, "select": select, "gt_size": counts["gt_size"],
                           "empty_label": counts["gt_size"] == 0}
    for mode in modes:
        idx = _first_argmax(dsc_all) if mode == "oracle" else select_masks(m, iou_pred=iou_pred, mode=mode)
        out[f"idx_{mode}"], out[f"dsc_{mode}"] = idx, dsc_all[rows, idx]
    idx = out[f"idx_{select}"]
    chosen = m[rows, idx]
    out.update(idx=idx, dsc=out[f"dsc_{select}"], intersection=counts["intersection"][rows, idx],
               pred_size=counts["pred_size"][rows, idx])
    per_item = _per_item_spacing(spacing, b)
    known = [i for i, sp in enumerate(per_item) if sp is not None]
    if "hd" in metrics:
        out["hd95"] = hd95(chosen, g, empty=empty)
        if known:
            out["hd95_mm"] = np.full(b, np.nan)
            out["hd95_mm"][known] = hd95(chosen[known], g[known], spacing=np.array([per_item[i] for i in known]),
                                         empty=empty)
    if "nsd" in metrics:
        all_known = len(known) == b
        out["nsd"] = nsd(chosen, g, nsd_tolerance, spacing=np.array(per_item) if all_known else None, empty=empty)
    return out


def _per_item_spacing(spacing: Any, b: int) -> list[tuple[float, ...] | None]:
    """``spacing`` as one entry per item (None: unknown)."""
    if spacing is None:
        return [None] * b
    if isinstance(spacing, (list, tuple)) and len(spacing) == b and \
            (spacing[0] is None or np.ndim(spacing[0]) == 1):
        return [None if sp is None else tuple(float(v) for v in sp) for sp in spacing]
    arr = np.asarray(spacing, dtype=np.float64)
    if arr.ndim == 2:
        return [tuple(row) for row in arr]
    return [tuple(np.broadcast_to(arr, (2,)).tolist())] * b
