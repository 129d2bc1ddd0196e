"""Choosing one of the model's outputs, and scoring the choice.

MedSegX predicts K masks per box (SAM backbones: the paper's 3, mask tokens 1..3; the lite model
with ``mask_outputs="all"``: the 4 tokens 0..3). The published evaluation keeps the one with the
best DSC against the label ("oracle": it uses the label, ties go to the first) and reports that
mask's HD95. The label-free rules (:data:`LABEL_FREE_MODES`, the only ones prediction may use) are
scored beside it so the gap can be reported. Each is a pure function of per-output scores
(:func:`choose`), ties to the first output:

- "first": output 0 (with ``mask_outputs="all"``: mask token 0, LiteMedSAM's trained output);
- "iou": the highest predicted IoU (the model's IoU head);
- "stability": the highest stability score (:func:`stability_scores`, SAM's automatic mask
  generator's: the IoU of the mask thresholded at logit +1 and at -1; needs the logits);
- "agreement": the output whose mask agrees most with the others (mean IoU, :func:`agreement_scores`);
- "iou_stable": the IoU head's choice among the outputs whose stability is at least
  :data:`STABILITY_THRESH` (SAM's default filter), output 0 where none is;
- "first_stable": output 0 where it is stable, else the IoU head's choice among the stable
  outputs, else the most stable one;
- "first_confident": output 0 where its predicted IoU is at least :data:`IOU_THRESH` (SAM's
  default filter), else output 1;
- "first_consensus": output 0 unless it is in doubt on both counts, its predicted IoU below
  :data:`IOU_THRESH` and its mask the one that agrees least with the others; then output 1.

With ``mask_outputs="all"`` output 0 is LiteMedSAM's trained token and output 1 SAM's first
ambiguity token. The offset and thresholds are SAM's published defaults (its automatic mask
generator's), fixed before any measurement here; which rule is the default was chosen on the
held-out sets (docs/GENERALISATION.md, "Choosing the output without a label").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..selection import LABEL_FREE_MODES, MODE_NEEDS, ORACLE, SELECTION_MODES
from ._inputs import SpacingLike, as_mask_batch, to_numpy
from .dice import count_true, dice_from_counts
from .surface import hd95, nsd

# SAM's automatic mask generator defaults (stability_score_offset, stability_score_thresh, pred_iou_thresh).
STABILITY_OFFSET = 1.0
STABILITY_THRESH = 0.95
IOU_THRESH = 0.88


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


def stability_scores(logits: Any, offset: float = STABILITY_OFFSET) -> np.ndarray:
    """Stability of each output ``B x K`` (float64): ``|logit > offset| / |logit > -offset|``.

    The mask thresholded at +offset lies inside the one thresholded at -offset, so this is their
    IoU: 1 when the mask's edge is sharp, low when much of it sits near the threshold. An output
    empty even at -offset scores 0 (nothing to choose). ``logits``: ``B x K x H x W`` float.
    """
    x = to_numpy(logits)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"stability needs float logits B x K x H x W, got {x.dtype} {x.shape}")
    b, k = x.shape[:2]
    high = count_true(np.ascontiguousarray(x > offset).reshape(b * k, -1)).reshape(b, k)
    low = count_true(np.ascontiguousarray(x > -offset).reshape(b * k, -1)).reshape(b, k)
    return np.where(low > 0, high / np.maximum(low, 1), 0.0)


def agreement_scores(masks: np.ndarray) -> np.ndarray:
    """How much each output agrees with the others ``B x K`` (float64): its mean IoU with each other
    output (two empty masks agree: IoU 1). A single output scores 1. ``masks``: ``B x K x H x W`` bool."""
    m = _multimask(masks)
    b, k = m.shape[:2]
    if k == 1:
        return np.ones((b, 1))
    flat = m.reshape(b, k, -1)
    size = np.stack([count_true(flat[:, i]) for i in range(k)], 1)
    total = np.zeros((b, k))
    for i in range(k):
        for j in range(i + 1, k):
            inter = count_true(np.ascontiguousarray(flat[:, i] & flat[:, j]))
            union = size[:, i] + size[:, j] - inter
            iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
            total[:, i] += iou
            total[:, j] += iou
    return total / (k - 1)


def choose(mode: str, shape: tuple[int, int], *, iou: Any = None, stability: Any = None, agreement: Any = None,
           stability_thresh: float = STABILITY_THRESH, iou_thresh: float = IOU_THRESH) -> np.ndarray:
    """The label-free rule ``mode`` on per-output scores (each ``B x K``, ``shape``) -> int64 ``B``, ties
    to the first output. A pure function: see the module docstring for the rules and :data:`MODE_NEEDS` for
    the scores each one reads."""
    if mode not in LABEL_FREE_MODES:
        raise ValueError(f"label-free mode must be one of {LABEL_FREE_MODES}, got {mode!r}")
    given = {"iou": iou, "stability": stability, "agreement": agreement}
    scores = {}
    for need in MODE_NEEDS[mode]:
        if given[need] is None:
            raise ValueError(f"mode {mode!r} needs the {need} scores (B x K)")
        scores[need] = np.asarray(to_numpy(given[need]), dtype=np.float64)
        if scores[need].shape != tuple(shape):
            raise ValueError(f"{need} scores must be B x K = {tuple(shape)}, got {scores[need].shape}")
    if mode == "first":
        return np.zeros(shape[0], np.int64)
    if mode in ("iou", "stability", "agreement"):
        return _first_argmax(scores[mode])
    if mode in ("first_confident", "first_consensus"):
        doubt = scores["iou"][:, 0] < iou_thresh
        if mode == "first_consensus":
            agree = scores["agreement"]
            doubt &= agree[:, 0] < agree[:, 1:].min(1, initial=np.inf)
        return np.where(doubt, min(1, shape[1] - 1), 0).astype(np.int64)
    stable = scores["stability"] >= stability_thresh
    best_stable = _first_argmax(np.where(stable, scores["iou"], -np.inf))
    if mode == "iou_stable":
        return np.where(stable.any(1), best_stable, 0).astype(np.int64)
    # first_stable
    fallback = np.where(stable.any(1), best_stable, _first_argmax(scores["stability"]))
    return np.where(stable[:, 0], 0, fallback).astype(np.int64)


def output_scores(masks_or_logits: Any, iou_pred: Any = None) -> dict[str, np.ndarray]:
    """The per-output scores the label-free rules read (each ``B x K`` float64): ``iou`` (given
    ``iou_pred``), ``stability`` (given float logits) and ``agreement`` (always)."""
    shape = tuple(np.shape(masks_or_logits))
    if len(shape) != 4:
        raise ValueError(f"multimask outputs must be B x K x H x W, got shape {shape}")
    out = {"agreement": agreement_scores(_multimask(masks_or_logits))}
    if iou_pred is not None:
        iou = to_numpy(iou_pred).astype(np.float64)
        if iou.shape != shape[:2]:
            raise ValueError(f"iou_pred must be {shape[:2]}, got {iou.shape}")
        out["iou"] = iou
    x = masks_or_logits
    if (isinstance(x, torch.Tensor) and x.is_floating_point()) or \
            (not isinstance(x, torch.Tensor) and np.issubdtype(np.asarray(x).dtype, np.floating)):
        out["stability"] = stability_scores(x.float() if isinstance(x, torch.Tensor) else x)
    return out


def available_modes(scores: dict[str, np.ndarray]) -> list[str]:
    """The label-free modes whose scores are in ``scores`` (see :func:`output_scores`)."""
    return [mode for mode in LABEL_FREE_MODES if all(need in scores for need in MODE_NEEDS[mode])]


def select_masks(masks_or_logits: Any, gt: Any = None, iou_pred: Any = None, mode: str = ORACLE) -> np.ndarray:
    """Index of the chosen output per item -> int64 ``B``.

    Args:
        masks_or_logits: ``B x K x H x W`` bool masks or float logits (see :func:`binarize`;
            "stability", "iou_stable" and "first_stable" need the logits).
        gt: label ``B x [1 x] H x W`` (needed for "oracle").
        iou_pred: predicted IoU ``B x K`` (needed for the modes that read the IoU head).
        mode: "oracle" (best DSC against the label, ties and empty labels -> the first) or one of
            :data:`LABEL_FREE_MODES` (see the module docstring).
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
        return choose("iou", shape[:2], iou=iou_pred)
    if mode != ORACLE:
        scores = {}
        if "stability" in MODE_NEEDS[mode]:
            scores["stability"] = stability_scores(masks_or_logits.float() if isinstance(masks_or_logits, torch.Tensor)
                                                   else masks_or_logits)
        if "agreement" in MODE_NEEDS[mode]:
            scores["agreement"] = agreement_scores(_multimask(masks_or_logits))
        return choose(mode, shape[:2], iou=iou_pred, **scores)
    if gt is None:
        raise ValueError("mode 'oracle' needs the label gt")
    m = _multimask(masks_or_logits)
    g = as_mask_batch(gt, "gt", 2)
    if g.shape != (m.shape[0],) + m.shape[2:]:
        raise ValueError(f"gt must be B x [1 x] H x W matching {m.shape}, got {np.shape(gt)}")
    return _first_argmax(dice_per_mask(m, g)["dsc"])


def score_multimask(masks_or_logits: Any, gt: Any, iou_pred: Any = None, *, select: str = ORACLE,
                    metrics: Sequence[str] = ("dsc", "hd"), spacing: Sequence[SpacingLike | None] | SpacingLike = None,
                    nsd_tolerance: float = 2.0, empty: str = "published") -> dict[str, np.ndarray]:
    """The one scorer of multimask outputs: every selection mode's choice and DSC, and the surface
    metrics of the output ``select`` chose.

    Args:
        masks_or_logits: ``B x K x H x W`` bool masks or float logits (masks alone: the modes that
            read the stability are absent).
        gt: label ``B x [1 x] H x W``.
        iou_pred: predicted IoU ``B x K``; without it the modes that read the IoU head are absent.
        select: the mode whose output is scored by HD95 / NSD and reported as ``dsc`` / ``idx``
            ("oracle" is the published protocol).
        metrics: "hd" adds ``hd95`` (pixels, as published); "nsd" adds ``nsd``.
        spacing: pixel spacing: one for all items, or one per item (None where unknown); adds
            ``hd95_mm`` (NaN where unknown) when "hd" is asked. NSD's tolerance is in the spacing's
            unit where the spacing is known for all items, else in pixels.
        empty: empty-mask policy of the surface metrics (default: the published one).

    Returns:
        dict of arrays ``B``: ``dsc_all`` (``B x K``); the rules' per-output scores ``score_<name>``
        (``B x K``: ``iou``, ``stability``, ``agreement``, see :func:`output_scores`); ``modes`` (those
        scored, oracle first); per mode ``idx_<mode>`` and ``dsc_<mode>``;
        ``select`` (the mode), ``idx`` and ``dsc`` (its choice), ``intersection`` / ``pred_size`` /
        ``gt_size`` of the chosen output (for volumetric DSC), ``empty_label`` (bool), and the
        surface metrics above.
    """
    m = _multimask(masks_or_logits)
    g = as_mask_batch(gt, "gt", 2)
    if g.shape != (m.shape[0],) + m.shape[2:]:
        raise ValueError(f"gt must be B x [1 x] H x W matching {m.shape}, got {np.shape(gt)}")
    scores = output_scores(masks_or_logits, iou_pred)
    modes = [ORACLE, *available_modes(scores)]
    if select not in modes:
        raise ValueError(f"select must be one of {modes}, got {select!r}")
    b = m.shape[0]
    rows = np.arange(b)
    counts = dice_per_mask(m, g)
    dsc_all = counts["dsc"]
    out: dict[str, Any] = {"dsc_all": dsc_all, "select": select, "gt_size": counts["gt_size"],
                           "empty_label": counts["gt_size"] == 0, "modes": modes,
                           **{f"score_{name}": value for name, value in scores.items()}}
    for mode in modes:
        idx = _first_argmax(dsc_all) if mode == ORACLE else choose(mode, m.shape[:2], **scores)
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
