"""A predicted label map scored against a reference label map: DSC, HD95 and NSD per object (3-D or 2-D)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .dice import dice
from .surface import hd95, nsd


class ScoredObject(NamedTuple):
    """One predicted object: its value in the label map and the reference values it is scored against."""

    label: int
    task: str | None
    reference_values: Sequence[int]


def score_reference(predicted: np.ndarray, reference: np.ndarray, objects: Sequence[ScoredObject],
                    spacing: Sequence[float] | None = None, nsd_tolerance: float = 2.0) -> list[dict]:
    """DSC, HD95 and NSD of each object of ``predicted`` against ``reference`` (same shape, stored order).

    Computed on the whole volume: false positives on slices without reference foreground count.
    Distances are in millimetres with ``spacing`` (numpy axis order), else in pixels. An object
    whose values are absent from the reference is reported, not scored.
    """
    dims = predicted.ndim
    unit = "px" if spacing is None else "mm"
    spacing = [1.0] * dims if spacing is None else list(spacing)
    rows = []
    for obj in objects:
        pred = (predicted == obj.label)[None]
        ref = np.isin(reference, obj.reference_values)[None]
        row: dict = {"label": obj.label, "task": obj.task, "reference_values": list(obj.reference_values),
                     "unit": unit, "pred_voxels": int(pred.sum()), "ref_voxels": int(ref.sum())}
        if not ref.any():
            row.update(dsc=None, hd95=None, nsd=None, note="the reference has no voxel of these values")
        else:
            row["dsc"] = float(dice(pred, ref, spatial_dims=dims)[0])
            value = float(hd95(pred, ref, spacing=spacing, empty="nan", spatial_dims=dims)[0])
            row["hd95"] = None if math.isnan(value) else value
            row["nsd"] = float(nsd(pred, ref, nsd_tolerance, spacing=spacing, empty="monai", spatial_dims=dims)[0])
            row["nsd_tolerance"] = nsd_tolerance
            if not pred.any():
                row["note"] = "empty prediction (HD95 undefined)"
        rows.append(row)
    return rows


def describe_scores(case: str, rows: Sequence[dict]) -> list[str]:
    """One line per row of :func:`score_reference`."""
    lines = []
    for r in rows:
        name = f"{case} label {r['label']}" + (f" ({r['task']})" if r["task"] else "")
        if r["dsc"] is None:
            lines.append(f"{name}: {r['note']}")
            continue
        hd = "n/a" if r["hd95"] is None else f"{r['hd95']:.2f} {r['unit']}"
        lines.append(f"{name}: DSC {r['dsc']:.4f}, HD95 {hd}, NSD@{r['nsd_tolerance']:g}{r['unit']} {r['nsd']:.4f}")
    return lines
