"""Evaluation reports: the published Markdown + CSV files, byte for byte, plus extra reports.

Published format (what ``evaluate_internal.py`` / ``evaluate_external.py`` wrote beside the model
weight, ``internal/ID.md|csv`` and ``external/<split>-<site|task>.md|csv``):

* ``<stem>.md``: ``# <title>``, a blank line, then the groups nested as bullets (internal:
  dataset -> task -> [sequence]; external: task -> dataset -> [sequence]); a group that holds
  slices is one line ``- name: DSC (0.xxxx), HD (x.xxxx)``, indented two spaces per level; then
  ``- ALL`` and ``  - Mean: DSC (...), HD (...)``.
* A group's numbers are the mean of its slices' values; ``ALL / Mean`` is the mean over ALL
  slices (not over groups). Checked on the released example: slice mean DSC 0.93950 -> 0.9395
  as printed, while the mean of the six group means would be 0.9279.
* ``<stem>.csv``: header ``File,DSC,HD``, one row per slice in evaluation order, values
  written as the shortest repr of the float32 the published code held (``0.9844867587089539``,
  ``1.0``), an empty field for NaN (pandas' default).
* Groups and slices appear in the order of the results given (the published scripts walk
  sorted folders, so the caller passes slices in sorted-folder order).

Inputs are per-slice :class:`SliceResult` records. Skipped slices (``skipped`` = a reason, e.g.
an empty label that crashed the published code) are left out of the published files and listed
in ``<stem>_details.md``, which also carries N, mean and std per task, the oracle-vs-honest
selection gap, HD95 in mm, the mean DSC of every output and of every selection rule, per-case DSC
and the worst slices. ``<stem>_cases.csv`` lists the per-case DSC, ``<stem>_outputs.csv`` every
output's DSC and scores per slice; ``<stem>_dsc_boxplot.png`` and ``<stem>_worst.png`` are figures.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.layout import EXTERNAL, INTERNAL, TASK_POSITION, case_and_slice, task_of
from .errors import UserError
from .fileio import atomic_write, atomic_write_set
from .selection import ORACLE

logger = logging.getLogger(__name__)



@dataclass
class SliceResult:
    """One scored slice.

    ``name`` is the CSV ``File`` key (e.g. ``AbdomenCT1K/CT_Liver/casenum_00371_sliceid_50.npy``);
    ``group`` the report nesting (default: the folders of ``name``). ``dsc`` / ``hd`` are the
    numbers of the published files: those of the output the ``select`` mode chose ("oracle", the
    paper's protocol, by default; HD95 in pixels). Optional: ``nsd``, the DSC of every selection
    mode ``dsc_oracle`` / ``dsc_iou`` / ``dsc_first``, ``hd95_mm``, ``case`` (default: parsed from
    ``casenum_<id>_sliceid_``), pixel counts for volumetric DSC, ``skipped`` (a reason; keeps the
    slice out of the published files) and ``index`` (dataset position, to fetch arrays). With
    ``dsc_outputs`` (the DSC of every output), ``dsc_modes`` (mode -> DSC of its choice) and
    ``output_scores`` (what the label-free rules read: name -> one value per output) the details
    gain the output-choice table and the report ``<stem>_outputs.csv``.
    """
    name: str
    group: tuple[str, ...] = field(default=())
    dsc: float = math.nan
    hd: float = math.nan
    select: str = ORACLE
    nsd: float | None = None
    dsc_oracle: float | None = None
    dsc_iou: float | None = None
    dsc_first: float | None = None
    hd95_mm: float | None = None
    case: str | None = None
    intersection: int | None = None
    pred_size: int | None = None
    gt_size: int | None = None
    skipped: str | None = None
    index: int | None = None
    dsc_outputs: list[float] | None = None
    dsc_modes: dict[str, float] | None = None
    output_scores: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if not self.group:
            self.group = tuple(self.name.split("/")[:-1])
        self.group = tuple(self.group)
        if not self.group:
            raise ValueError(f"result {self.name!r}: no group (pass group= or a name with folders)")
        if self.case is None:
            self.case = case_and_slice(self.name.rsplit("/", 1)[-1])[0]
        if self.dsc_oracle is None and self.select == ORACLE:
            self.dsc_oracle = self.dsc


# ----------------------------------------------------------------------------- naming

def internal_title() -> str:
    return "internal evaluation"


def external_title(shift_type: str) -> str:
    """``shift_type`` is ``cross_site`` or ``cross_task``."""
    return f"external {shift_type} evaluation"


# ----------------------------------------------------------------------------- published files

def _scored(results: Iterable[SliceResult]) -> list[SliceResult]:
    return [r for r in results if r.skipped is None]


def _as_published(v: float | None, float32: bool) -> float:
    v = math.nan if v is None else float(v)
    return float(np.float32(v)) if float32 else v


def _mean(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _tree(results: Sequence[SliceResult]) -> dict:
    """Nested dict of groups in first-appearance order; leaves hold their results."""
    root: dict = {}
    for r in results:
        node = root
        for depth, part in enumerate(r.group):
            node = node.setdefault(part, {"children": {}, "results": []})
            if depth == len(r.group) - 1:
                node["results"].append(r)
            else:
                node = node["children"]
    return root


def format_summary_md(results: Sequence[SliceResult], title: str, float32: bool = True) -> str:
    """The published Markdown summary (see the module docstring)."""
    scored = _scored(results)
    if not scored:
        raise ValueError("no scored slices to report")
    lines = [f"# {title}", ""]

    def fmt(rs: Sequence[SliceResult]) -> str:
        d = _mean([_as_published(r.dsc, float32) for r in rs])
        h = _mean([_as_published(r.hd, float32) for r in rs])
        return f"DSC ({d:.4f}), HD ({h:.4f})"

    def walk(nodes: dict, depth: int, path: tuple[str, ...]) -> None:
        for name, node in nodes.items():
            indent = "  " * depth
            if node["results"] and node["children"]:
                raise ValueError(f"group {'/'.join(path + (name,))} holds slices and subgroups; "
                                 "the published format cannot show both")
            if node["results"]:
                lines.append(f"{indent}- {name}: {fmt(node['results'])}")
            else:
                lines.append(f"{indent}- {name}")
                walk(node["children"], depth + 1, path + (name,))

    walk(_tree(scored), 0, ())
    lines += ["- ALL", f"  - Mean: {fmt(scored)}"]
    return "\n".join(lines) + "\n"


def _csv_float(v: float) -> str:
    if math.isnan(v):
        return ""  # pandas writes NaN as an empty field
    return repr(v)


def format_slices_csv(results: Sequence[SliceResult], float32: bool = True) -> str:
    """The published per-slice CSV (``File,DSC,HD``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["File", "DSC", "HD"])
    for r in _scored(results):
        writer.writerow([r.name, _csv_float(_as_published(r.dsc, float32)), _csv_float(_as_published(r.hd, float32))])
    return buf.getvalue()


# ----------------------------------------------------------------------------- details

def _task_of(r: SliceResult, layout: str) -> str:
    return task_of(r.group, layout)


def _stats(values: Iterable[float | None]) -> tuple[int, float, float]:
    a = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0, math.nan, math.nan
    return int(a.size), float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _ms(values: Iterable[float | None], digits: int = 4, missing: str = "-") -> str:
    n, m, s = _stats(values)
    return missing if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def case_dsc(results: Sequence[SliceResult]) -> list[dict[str, Any]]:
    """Per-case DSC: slices grouped by (group, case).

    ``dsc_volume`` = 2 Σ intersection / (Σ pred + Σ gt) over the case's scored slices when every
    slice carries pixel counts (a 3-D DSC over the slices that were evaluated), else NaN;
    ``dsc_slice_mean`` = mean of the slices' DSC. ``dsc`` is the first when available.
    """
    cases: dict[tuple, list[SliceResult]] = {}
    for r in _scored(results):
        cases.setdefault(r.group + (r.case,), []).append(r)
    out = []
    for key, rs in cases.items():
        counts = all(r.intersection is not None and r.pred_size is not None and r.gt_size is not None for r in rs)
        vol = math.nan
        if counts:
            inter = sum(int(r.intersection) for r in rs)
            denom = sum(int(r.pred_size) + int(r.gt_size) for r in rs)
            gt = sum(int(r.gt_size) for r in rs)
            vol = 2.0 * inter / denom if gt > 0 else math.nan
        slice_mean = _mean([r.dsc for r in rs])
        out.append({"group": key[:-1], "case": key[-1], "n_slices": len(rs), "dsc_volume": vol,
                    "dsc_slice_mean": slice_mean, "dsc": vol if counts else slice_mean})
    return out


def worst_results(results: Sequence[SliceResult], k: int = 12) -> list[SliceResult]:
    """The ``k`` scored slices with the lowest DSC (NaN last), worst first."""
    scored = _scored(results)
    return sorted(scored, key=lambda r: (math.isnan(r.dsc), r.dsc))[:k]


def format_details_md(results: Sequence[SliceResult], title: str, layout: str = INTERNAL,
                      worst: int = 20) -> str:
    """Extra statistics beside the published summary (see the module docstring)."""
    if layout not in TASK_POSITION:
        raise ValueError(f"layout must be one of {list(TASK_POSITION)}, got {layout!r}")
    scored = _scored(results)
    skipped = [r for r in results if r.skipped is not None]
    cases = case_dsc(results)
    lines = [f"# {title}: details", ""]
    modes = sorted({r.select for r in scored}) or [ORACLE]
    chosen = ", ".join(modes)
    lines.append(f"Slices scored: {len(scored)}; skipped: {len(skipped)}. The published files (`.md`, `.csv`) and the "
                 f"DSC / HD95 columns below score the output chosen by `--select {chosen}`"
                 + (" (the paper's protocol: the output with the best DSC against the label)" if modes == [ORACLE]
                    else "; the published tables use oracle selection") + ". DSC (oracle) looks at the label; "
                 "DSC (iou) and DSC (first) choose without it, so oracle - iou is the selection gap. HD is HD95 in "
                 "pixels of the scored grid; HD95 mm uses the slice spacing where it is known (n/a: no physical "
                 "spacing, e.g. 2-D pictures). Means ignore NaN; NaN counts are listed below.")
    lines.append("")

    def row(label: str, rs: Sequence[SliceResult], cs: Sequence[dict]) -> str:
        n = len(rs)
        oracle = _stats(r.dsc_oracle for r in rs)
        iou = _stats(r.dsc_iou for r in rs)
        gap = f"{oracle[1] - iou[1]:+.4f}" if iou[0] and oracle[0] else "-"
        return (f"| {label} | {n} | {_ms(r.dsc for r in rs)} | {_ms(r.dsc_oracle for r in rs)} | "
                f"{_ms(r.dsc_iou for r in rs)} | {_ms(r.dsc_first for r in rs)} | {gap} | {_ms((r.hd for r in rs), 2)} | "
                f"{_ms((r.hd95_mm for r in rs), 2, missing='n/a')} | {_ms(r.nsd for r in rs)} | {len(cs)} | "
                f"{_ms(c['dsc'] for c in cs)} |")

    header = (f"| {{}} | N | DSC (scored: {chosen}) | DSC (oracle) | DSC (iou) | DSC (first) | oracle - iou | HD95 px | "
              "HD95 mm | NSD | cases | case DSC |")
    sep = "|---|---:|---|---|---|---|---:|---|---|---|---:|---|"
    lines += ["## Per task", "", header.format("task"), sep]
    by_task: dict[str, list[SliceResult]] = {}
    for r in scored:
        by_task.setdefault(_task_of(r, layout), []).append(r)
    for task, rs in by_task.items():
        cs = [c for c in cases if task_of(c["group"], layout) == task]
        lines.append(row(task, rs, cs))
    lines.append(row("ALL", scored, cases))
    lines += ["", "## Per group (as in the summary)", "", header.format("group"), sep]
    by_group: dict[tuple, list[SliceResult]] = {}
    for r in scored:
        by_group.setdefault(r.group, []).append(r)
    for grp, rs in by_group.items():
        lines.append(row("/".join(grp), rs, [c for c in cases if c["group"] == grp]))
    lines += _choice_table(scored, layout)
    vol = sum(1 for c in cases if not math.isnan(c["dsc_volume"]))
    lines += ["", f"Case DSC: {vol} of {len(cases)} cases volumetric (2·Σ|P∩G| / (Σ|P|+Σ|G|) over the case's "
              "scored slices, from per-slice pixel counts); the rest mean of slice DSC. Per-case values: "
              "`*_cases.csv`.", ""]
    nan_dsc = sum(1 for r in scored if r.dsc is None or math.isnan(r.dsc))
    nan_hd = sum(1 for r in scored if r.hd is None or math.isnan(r.hd))
    inf_hd = sum(1 for r in scored if r.hd is not None and math.isinf(r.hd))
    lines += ["## Missing values", "", f"- DSC NaN: {nan_dsc}", f"- HD NaN: {nan_hd}", f"- HD inf: {inf_hd}", ""]
    lines += ["## Skipped slices", ""]
    if skipped:
        reasons: dict[str, int] = {}
        for r in skipped:
            reasons[r.skipped] = reasons.get(r.skipped, 0) + 1
        lines += [f"- {reason}: {n}" for reason, n in reasons.items()]
        lines += ["", "| File | reason |", "|---|---|"]
        lines += [f"| {r.name} | {r.skipped} |" for r in skipped]
    else:
        lines.append("None.")
    lines += ["", f"## Worst {min(worst, len(scored))} slices (lowest DSC)", "", "| File | DSC | HD95 px |", "|---|---:|---:|"]
    lines += [f"| {r.name} | {r.dsc:.4f} | {r.hd:.4f} |" for r in worst_results(results, worst)]
    return "\n".join(lines) + "\n"


def _choice_modes(scored: Sequence[SliceResult]) -> tuple[int, list[str]]:
    """(number of outputs, the modes every slice scored, oracle first) of results that carry them."""
    if not scored or any(r.dsc_outputs is None or r.dsc_modes is None for r in scored):
        return 0, []
    k = min(len(r.dsc_outputs) for r in scored)
    modes = [m for m in scored[0].dsc_modes if all(m in r.dsc_modes for r in scored)]
    return k, sorted(modes, key=lambda m: m != ORACLE)


def _choice_table(scored: Sequence[SliceResult], layout: str) -> list[str]:
    """The output-choice section of the details: mean DSC of every fixed output and of every mode's
    choice, per task and over all slices (empty without per-output DSCs)."""
    k, modes = _choice_modes(scored)
    if not k:
        return []
    chosen = scored[0].select
    names = [f"output {i}" for i in range(k)] + [m + (" (scored)" if m == chosen else "") for m in modes]
    lines = ["", "## Output choice", "",
             f"Mean DSC of each of the {k} outputs taken always, and of each selection mode's choice (oracle looks "
             "at the label; the others do not: metrics/select.py). Last column: the scored mode against the "
             "best fixed output.", "",
             "| task | N | " + " | ".join(names) + " | scored - best output |",
             "|---|---:|" + "---:|" * (len(names) + 1)]
    by_task: dict[str, list[SliceResult]] = {}
    for r in scored:
        by_task.setdefault(_task_of(r, layout), []).append(r)
    for task, rs in [*by_task.items(), ("ALL", list(scored))]:
        fixed = [_mean([r.dsc_outputs[i] for r in rs]) for i in range(k)]
        by_mode = [_mean([r.dsc_modes[m] for r in rs]) for m in modes]
        scored_mean = _mean([r.dsc for r in rs])
        best = max((v for v in fixed if not math.isnan(v)), default=math.nan)
        cells = [f"{v:.4f}" for v in fixed + by_mode]
        lines.append(f"| {task} | {len(rs)} | " + " | ".join(cells) + f" | {scored_mean - best:+.4f} |")
    return lines


def format_outputs_csv(results: Sequence[SliceResult]) -> str:
    """``<stem>_outputs.csv``: per scored slice, the DSC of every output, the rules' scores of every
    output and the DSC of every mode's choice (what the output-choice study reads)."""
    scored = _scored(results)
    k, modes = _choice_modes(scored)
    score_names = [n for n in ("iou", "stability", "agreement")
                   if all(r.output_scores and n in r.output_scores for r in scored)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["File", "Select"] + [f"DSC_{i}" for i in range(k)]
                    + [f"{n}_{i}" for n in score_names for i in range(k)] + [f"DSC_{m}" for m in modes])
    for r in scored:
        writer.writerow([r.name, r.select] + [_csv_float(float(v)) for v in r.dsc_outputs[:k]]
                        + [_csv_float(float(r.output_scores[n][i])) for n in score_names for i in range(k)]
                        + [_csv_float(float(r.dsc_modes[m])) for m in modes])
    return buf.getvalue()


def format_cases_csv(results: Sequence[SliceResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Group", "Case", "Slices", "DSC_volume", "DSC_slice_mean"])
    for c in case_dsc(results):
        writer.writerow(["/".join(c["group"]), c["case"], c["n_slices"], _csv_float(c["dsc_volume"]),
                         _csv_float(c["dsc_slice_mean"])])
    return buf.getvalue()


# ----------------------------------------------------------------------------- figures

def plot_dsc_boxplot(results: Sequence[SliceResult], path: str | Path | None, layout: str = INTERNAL,
                     title: str = "") -> Path | Any:
    """PNG box plot of slice DSC per task, written to ``path`` (None: the PNG writer, see :mod:`medsegx.fileio`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, list[float]] = {}
    for r in _scored(results):
        if r.dsc is not None and not math.isnan(r.dsc):
            by_task.setdefault(_task_of(r, layout), []).append(float(r.dsc))
    names = list(by_task)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 4.5))
    if names:
        ax.boxplot([by_task[n] for n in names], showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), [f"{n} ({len(by_task[n])})" for n in names], rotation=60,
                      ha="right", fontsize=8)
    ax.set_ylabel("DSC")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "DSC per task (N slices)")
    fig.tight_layout()
    return _finish_figure(fig, path, dpi=100)


def _display_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(np.min(img)), float(np.max(img))
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _fit_title(text: str, width: int = 46) -> str:
    """A title that fits its panel: wrapped at '/' and spaces, a too-long piece shortened in the middle."""
    parts, line, lines = re.split(r"(?<=/)|(?<= )", text), "", []
    for part in parts:
        if len(part) > width:
            part = part[: width // 2 - 1] + "…" + part[-(width // 2 - 1):]
        if len(line) + len(part) > width and line:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line])


def plot_gallery(samples: Sequence[dict[str, Any]], path: str | Path | None) -> Path | Any:
    """PNG gallery, one row per sample: the image, the label (green) and the prediction (red) over it.

    Each sample: ``{"title": str, "image": H x W [x 3] or 3 x H x W, "label": H x W, "pred": H x W}``
    (e.g. the worst slices from :func:`worst_results`, arrays fetched by ``index``). The prediction
    panel also outlines the label, so misses and false positives read at a glance.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = max(1, len(samples))
    # no ticks at all (the axes are off; the layout would still measure them), each overlay blended into its
    # panel's pixels (one image per panel), a quick PNG compression: the same figure in about half the time
    fig, axes = plt.subplots(n, 3, figsize=(9.5, 3.6 * n + 0.5), squeeze=False, layout="constrained",
                             subplot_kw={"xticks": [], "yticks": []})
    for ax in axes.ravel():
        ax.axis("off")
    for row, s in enumerate(samples):
        img = _display_image(s["image"])
        label = np.asarray(s["label"]).astype(bool).reshape(img.shape[:2])
        pred = np.asarray(s["pred"]).astype(bool).reshape(img.shape[:2])
        cmap = "gray" if img.ndim == 2 else None
        for col, (mask, color, name) in enumerate([(None, None, "image"), (label, (0, 1, 0), "label"),
                                                   (pred, (1, 0, 0), "prediction")]):
            ax = axes[row, col]
            if mask is None:
                ax.imshow(img, cmap=cmap)
            else:
                ax.imshow(_blend(img, mask, color, 0.45))
                if col == 2 and label.any():
                    ax.contour(label, levels=[0.5], colors=["lime"], linewidths=0.8)
            ax.set_title(_fit_title(s.get("title", "")) + f"\n{name}" if col == 0 else name, fontsize=7, loc="left")
    fig.legend(handles=[Patch(color=(0, 1, 0, 0.45), label="label"), Patch(color=(1, 0, 0, 0.45), label="prediction"),
                        Line2D([], [], color="lime", lw=1, label="label outline")],
               loc="outside upper center", ncol=3, fontsize=8, frameon=False)
    return _finish_figure(fig, path, dpi=80, pil_kwargs={"compress_level": 1})


def _blend(img: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], alpha: float) -> np.ndarray:
    """``img`` (H x W grey or H x W x 3, in 0..1) as RGB with ``color`` laid over ``mask`` at opacity ``alpha``."""
    rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else np.array(img, dtype=np.float64)
    rgb[mask] = rgb[mask] * (1 - alpha) + np.asarray(color, dtype=np.float64) * alpha
    return rgb


def plot_label_overlay(panels: Sequence[dict[str, Any]], legend: Sequence[tuple[int, str]], aspect: float,
                       path: str | Path) -> Path:
    """PNG of slices side by side, each with its label map over it (one colour per label value) and boxes.

    Each panel: ``{"title": str, "image": H x W in 0..1 (grey), "labels": H x W label values,
    "boxes": [(label, x, y, width, height), ...]}`` in pixels; ``legend``: ``(label, name)`` pairs;
    ``aspect``: the height of a pixel over its width. Written with the permissions ``open()`` gives.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colours = plt.get_cmap("tab10")
    height, width = panels[0]["image"].shape[:2]
    panel_height = 3.6 * min(max(height * aspect / width, 0.3), 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), panel_height + 0.9), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.imshow(np.clip(panel["image"], 0, 1), cmap="gray", aspect=aspect, interpolation="nearest")
        labels = panel["labels"]
        overlay = np.zeros((*labels.shape, 4))
        for value in np.unique(labels[labels > 0]):
            overlay[labels == value] = (*colours(int(value) % 10)[:3], 0.45)
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        for label, x, y, w, h in panel["boxes"]:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.0, ec=colours(label % 10)))
        ax.set_title(panel["title"], fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=colours(label % 10), label=name) for label, name in legend]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return _finish_figure(fig, path, like_open=True, dpi=110)


def _finish_figure(fig: Any, path: str | Path | None, like_open: bool = False, **savefig_kwargs: Any) -> Path | Any:
    """Write ``fig`` atomically to ``path``; with ``path=None``, render it now and return a PNG writer."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    data = buf.getvalue()
    write = lambda handle: handle.write(data)  # noqa: E731
    if path is None:
        return write
    return atomic_write(path, write, like_open=like_open)


# ----------------------------------------------------------------------------- everything

def write_report(results: Sequence[SliceResult], out_dir: str | Path, stem: str, title: str,
                 layout: str = INTERNAL, gallery: Sequence[dict[str, Any]] | None = None,
                 float32: bool = True, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Published ``<stem>.md|csv`` plus ``<stem>_details.md`` (with ``notes`` at its end),
    ``<stem>_cases.csv``, ``<stem>_dsc_boxplot.png``, ``<stem>_outputs.csv`` where the results carry
    every output's DSC, and, given samples, ``<stem>_worst.png`` -> paths
    by kind. The files are written as one set: all or none replace the previous report."""
    out = Path(out_dir)
    details = format_details_md(results, title, layout)
    if notes:
        details += "\n## Notes\n\n" + "\n\n".join(notes) + "\n"
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "details": out / f"{stem}_details.md",
             "cases": out / f"{stem}_cases.csv", "boxplot": out / f"{stem}_dsc_boxplot.png"}
    contents: dict[Path, Any] = {
        paths["md"]: format_summary_md(results, title, float32),
        paths["csv"]: format_slices_csv(results, float32),
        paths["details"]: details,
        paths["cases"]: format_cases_csv(results),
        paths["boxplot"]: plot_dsc_boxplot(results, None, layout, title),
    }
    if _choice_modes(_scored(results))[0]:
        paths["outputs"] = out / f"{stem}_outputs.csv"
        contents[paths["outputs"]] = format_outputs_csv(results)
    if gallery:
        paths["gallery"] = out / f"{stem}_worst.png"
        contents[paths["gallery"]] = plot_gallery(gallery, None)
    atomic_write_set(contents)
    skipped = sum(1 for r in results if r.skipped is not None)
    if skipped:
        logger.warning("%s: %d slice(s) skipped (listed in %s)", stem, skipped, paths["details"].name)
    return paths


def plot_history(history_path: Path, out_png: Path) -> None:
    """Loss and validation DSC curves of a run (``history.jsonl``), as PNG, with whole-epoch ticks."""
    if not history_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    series = [([(r["epoch"], r["loss"]) for r in rows], "training loss (Dice+BCE)", "loss", "tab:blue"),
              ([(r["epoch"], r["val_dsc"]) for r in rows if "val_dsc" in r], "validation DSC", "validation DSC",
               "tab:green")]
    for ax, (points, ylabel, title, color) in zip(axes, series):
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o", color=color)
            ax.annotate(f"{values[-1]:.4f}", (epochs[-1], values[-1]), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
            lo, hi = min(values), max(values)
            pad = max(0.05 * (hi - lo), 0.02 * max(abs(hi), 1e-3))
            ax.set_ylim(lo - pad, hi + pad)  # one point: a narrow band, not matplotlib's default +-4% ticks
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    fig.tight_layout()
    _finish_figure(fig, out_png, dpi=100)


# ----------------------------------------------------------------------------- comparing two reports

def _read_dsc_column(path: Path) -> dict[str, float]:
    """``File -> DSC`` of a published-format report CSV."""
    if not Path(path).is_file():
        raise UserError(f"{path}: report not found")
    with open(path, newline="", encoding="utf-8") as f:
        return {row["File"]: float(row["DSC"] or "nan") for row in csv.DictReader(f)}


def compare_reports(a: Path, b: Path, labels: tuple[str, str], external: bool) -> str:
    """Markdown table of mean DSC per task for two reports over the same slices."""
    da, db = _read_dsc_column(a), _read_dsc_column(b)
    common = sorted(set(da) & set(db))
    if not common:
        raise UserError(f"{a} and {b} share no slice")
    per_task: dict[str, list[str]] = defaultdict(list)
    for key in common:
        per_task[task_of(key, EXTERNAL if external else INTERNAL)].append(key)
    lines = [f"| task | N | {labels[0]} DSC | {labels[1]} DSC | change |", "|---|---|---|---|---|"]
    for task, keys in sorted(per_task.items()) + [("ALL (mean over slices)", common)]:
        ma, mb = np.mean([da[k] for k in keys]), np.mean([db[k] for k in keys])
        lines.append(f"| {task} | {len(keys)} | {ma:.4f} | {mb:.4f} | {mb - ma:+.4f} |")
    if mb < ma:  # the ALL row: say it, whatever the table's reader looks at first
        lines += ["", f"**{labels[1]} is worse than {labels[0]} overall ({mb - ma:+.4f} mean DSC).**"]
    return "\n".join(lines) + "\n"
