"""Conversion of labelled volumes and 2-D image/mask pairs into MedSegDB slices (``prepare_data.py``).

The stages, one module each: sources are found, paired and read with their geometry checked
(:mod:`~medsegx.data.sources`), re-ordered into a canonical slice stack (:mod:`~medsegx.data.volume`),
windowed or clipped and resampled to 256 (:mod:`~medsegx.data.intensity`, choices in
:mod:`~medsegx.data.presets`), and described in ``meta.json`` (:mod:`~medsegx.data.meta`). This
module converts a case and a batch of them.

Output (MedSegDB, see :mod:`medsegx.data.layout`)
-------------------------------------------------
* ID / training layout: ``out/Dataset/Modality_Task/[Sequence/]npy_imgs|npy_gts/``
* new OOD site: ``out/Modality_Task/Dataset/[Sequence/]finetune|inference/npy_imgs|npy_gts/``,
  split per case (a case never lands on both sides), seeded.

A slice is ``npy_imgs/casenum_{case}_sliceid_{k}.npy`` (256, 256, 3) uint8 and
``npy_gts/<same name>`` (256, 256) uint8 0/1, ``k`` being the slice index along the slicing axis.
A multi-label mask becomes one ``Modality_Task`` folder per entry of the label map; only slices
holding foreground of that task are written unless ``keep_empty``. Every task folder holds
``meta.json``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import ConversionError
from .grid import SLICE_SIZE
from .intensity import resize_mask
from .layout import (
    FINETUNE,
    IMAGES_DIR,
    INFERENCE,
    MASKS_DIR,
    SUBSETS,
    external_folder,
    id_folder,
    site_folder,
    slice_glob,
    slice_name,
)
from .meta import META_FILE, META_FORMAT, write_meta
from .presets import AXES, DEFAULT_AXIS, DEFAULT_ORIENT, DEFAULT_PERCENTILES, ORIENTATION_WORDS, ORIENTATIONS
from .sources import case_id_from_path, pair_inputs, read_image, read_label, series_info
from .volume import model_slice, slice_stack, stack_intensity

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9-]+$")


# --------------------------------------------------------------------------- configuration


@dataclass
class ConvertConfig:
    """What to convert and where to.

    ``labels_map`` maps a task name (``Liver``) to the label values that form it (``(1,)``; several
    values are merged, e.g. kidney = kidney + tumour). ``window`` overrides the per-task CT window
    (level, width). ``finetune_fraction`` is the fraction of cases going to ``finetune/`` for an
    OOD site (0 puts every case in ``inference/``).
    """

    modality: str
    dataset: str
    labels_map: dict[str, tuple[int, ...]]
    out: Path
    sequence: str | None = None
    ood_site: bool = False
    finetune_fraction: float = 0.5
    seed: int = 0
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    axis: str = DEFAULT_AXIS
    keep_empty: bool = False
    min_pixels: int = 1
    slice_step: int = 1
    orient: str = DEFAULT_ORIENT
    geometry_tolerance: float = 0.01
    case_ids: str = "stem"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        # the task folder is split on its first '_', so a modality must not hold one (datasets may)
        if not re.fullmatch(r"[A-Za-z0-9-]+", self.modality or ""):
            raise ValueError(f"invalid modality {self.modality!r}: letters, digits and '-' only (e.g. CT, MRI)")
        if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
            raise ValueError(f"invalid dataset name {self.dataset!r}")
        if self.sequence is not None and (not self.sequence or "/" in self.sequence):
            raise ValueError(f"invalid sequence {self.sequence!r}")
        if not self.labels_map:
            raise ValueError("labels_map is empty: give at least one 'value:Task'")
        for task in self.labels_map:
            if not re.fullmatch(r"[A-Za-z0-9]+", task):
                raise ValueError(f"invalid task name {task!r}: letters and digits only (e.g. LiverCancer)")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.orient not in ORIENTATIONS:
            raise ValueError(f"orient must be {ORIENTATION_WORDS}, got {self.orient!r}")
        if not 0.0 <= self.finetune_fraction <= 1.0:
            raise ValueError(f"finetune_fraction must lie in [0, 1], got {self.finetune_fraction}")
        if self.slice_step < 1 or self.min_pixels < 1:
            raise ValueError(f"slice_step and min_pixels must be >= 1, got {self.slice_step} and {self.min_pixels}")
        if self.case_ids not in ("stem", "index"):
            raise ValueError(f"case_ids must be 'stem' or 'index', got {self.case_ids!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")

    def task_folder(self, task: str) -> str:
        return f"{self.modality}_{task}"

    def meta_dir(self, task: str) -> Path:
        """Folder holding ``meta.json`` (and, for the ID layout, ``npy_imgs``/``npy_gts``)."""
        if self.ood_site:
            return site_folder(self.out, self.task_folder(task), self.dataset, self.sequence)
        return id_folder(self.out, self.dataset, self.task_folder(task), self.sequence)

    def slice_dir(self, task: str, split: str | None) -> Path:
        """Folder holding ``npy_imgs``/``npy_gts`` for ``task`` (and ``split`` on an OOD site)."""
        if self.ood_site:
            return external_folder(self.out, self.task_folder(task), self.dataset, self.sequence, split)
        return self.meta_dir(task)


def parse_labels_map(text: str | Mapping) -> dict[str, tuple[int, ...]]:
    """``"1:Liver,2:LiverCancer"`` (or a JSON file / mapping of the same) -> ``{task: label values}``.

    ``"1+2:Kidney"`` merges values into one task; a task named twice collects both values.
    """
    if isinstance(text, Mapping):
        items = [(str(k), str(v)) for k, v in text.items()]
    elif str(text).endswith(".json"):
        path = Path(text)
        try:
            items = [(str(k), str(v)) for k, v in json.loads(path.read_text(encoding="utf-8")).items()]
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path}: cannot read the label map ({err})") from err
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if ":" not in part:
                raise ValueError(f"label map entry {part!r} is not 'value:Task' (in {text!r})")
            key, task = part.split(":", 1)
            items.append((key.strip(), task.strip()))
    out: dict[str, list[int]] = {}
    for key, task in items:
        try:
            values = [int(v) for v in key.split("+")]
        except ValueError as err:
            raise ValueError(f"label map key {key!r} is not an integer label value") from err
        if any(v <= 0 for v in values):
            raise ValueError(f"label value {key!r} must be positive (0 is background)")
        out.setdefault(task, []).extend(values)
    if not out:
        raise ValueError(f"empty label map {text!r}")
    return {task: tuple(sorted(set(values))) for task, values in out.items()}


# --------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    """What one converted case wrote: per task, the meta entries and slice names."""

    case: str
    image: Path
    label: Path
    split: str | None
    entries: dict[str, dict] = field(default_factory=dict)     # task -> case entry for meta.json
    slices: dict[str, dict[str, dict]] = field(default_factory=dict)  # task -> {name: slice entry}
    absent: list[str] = field(default_factory=list)             # tasks with no foreground


def _remove_case_slices(cfg: ConvertConfig, task: str, case: str) -> None:
    """Delete earlier slices of ``case`` so a re-run never leaves stale ones (or one on each side)."""
    splits = SUBSETS if cfg.ood_site else (None,)
    pattern = slice_glob(glob.escape(case))
    for split in splits:
        for sub in (IMAGES_DIR, MASKS_DIR):
            for path in (cfg.slice_dir(task, split) / sub).glob(pattern):
                path.unlink()


def convert_case(image_path: str | Path, label_path: str | Path, cfg: ConvertConfig,
                 case: str | None = None, split: str | None = None) -> CaseResult:
    """Convert one image + label into slices of every task of ``cfg.labels_map``.

    Writes ``npy_imgs``/``npy_gts`` files and returns their meta entries (write them with
    :func:`update_meta`; :func:`convert_dataset` does both). Raises :class:`ConversionError` naming
    the file for unreadable input, a geometry mismatch or an unsupported image.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    case = case or case_id_from_path(image_path)
    if not _NAME_RE.match(case):
        raise ConversionError(f"{image_path}: case id {case!r} may hold letters, digits and '-' only")
    if cfg.ood_site and split is None:
        raise ConversionError(f"{image_path}: an OOD site conversion needs the case's split")
    image = read_image(image_path)
    stack = slice_stack(image, image_path, cfg.axis, cfg.orient)
    is_2d = stack.is_2d
    label_arr = read_label(label_path, image, image_path, cfg.geometry_tolerance)
    if is_2d and label_arr.max() > max(v for values in cfg.labels_map.values() for v in values) \
            and len(cfg.labels_map) == 1:
        # 0/255 (or lossy JPEG) masks of a single task: threshold at half range
        label_arr = (label_arr >= 128).astype(np.int32) * cfg.labels_map[next(iter(cfg.labels_map))][0]
    label_vol = stack.to_canonical(label_arr)

    known = {v for values in cfg.labels_map.values() for v in values}
    unknown = sorted(set(np.unique(label_vol).tolist()) - known - {0})
    if unknown:
        logger.warning("%s: label values %s are not in the label map; ignored", label_path, unknown)

    axis = stack.axis_index
    spacing_256 = stack.record["spacing_256"]
    result = CaseResult(case=case, image=image_path, label=label_path, split=split)
    bounds_cache: dict[tuple, dict] = {}
    image_cache: dict[tuple, np.ndarray] = {}
    other_axes = tuple(a for a in range(label_vol.ndim) if a != axis)

    for task, values in cfg.labels_map.items():
        task_mask = np.isin(label_vol, values)
        present = np.flatnonzero(task_mask.any(axis=other_axes))
        if present.size == 0:
            result.absent.append(task)
            logger.info("%s: no voxel of %s (values %s)", label_path, task, list(values))
        candidates = range(stack.n_slices) if cfg.keep_empty else present.tolist()
        candidates = list(candidates)[::cfg.slice_step]  # every slice_step-th: thins dense stacks
        bounds = stack_intensity(stack, cfg.modality, task, cfg.window, cfg.percentiles, bounds_cache)
        _remove_case_slices(cfg, task, case)
        out_dir = cfg.slice_dir(task, split)
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / MASKS_DIR).mkdir(parents=True, exist_ok=True)
        written: list[int] = []
        for k in candidates:
            gt = resize_mask(stack.plane(k, task_mask)).astype(np.uint8)
            if not cfg.keep_empty and int(gt.sum()) < cfg.min_pixels:
                continue  # foreground too small to survive the 256 grid
            cache_key = (bounds.get("mode"), bounds.get("lo"), bounds.get("hi"), k)
            if cache_key not in image_cache:
                image_cache[cache_key] = model_slice(stack, k, bounds)
            name = slice_name(case, k)
            np.save(out_dir / IMAGES_DIR / name, image_cache[cache_key])
            np.save(out_dir / MASKS_DIR / name, gt)
            written.append(int(k))
        result.entries[task] = {
            "image": str(image_path), "label": str(label_path), "label_values": list(values),
            **stack.record, "split": split, "intensity": bounds, "slices": written,
            # a 2-D picture (PNG, JPEG, ...) carries no physical pixel size: no millimetre metrics
            "spacing_known": not is_2d, **series_info(image),
        }
        result.slices[task] = {
            slice_name(case, k): {"case": case, "sliceid": k, "split": split, "spacing_256": spacing_256}
            for k in written
        }
    return result


# --------------------------------------------------------------------------- meta.json


def update_meta(cfg: ConvertConfig, results: Iterable[CaseResult]) -> list[Path]:
    """Merge the cases of ``results`` into each task folder's ``meta.json``; returns the files."""
    by_task: dict[str, list[CaseResult]] = {}
    for res in results:
        for task in res.entries:
            by_task.setdefault(task, []).append(res)
    written = []
    for task, results_of_task in by_task.items():
        header = {
            "format": META_FORMAT, "modality": cfg.modality, "task": task,
            "task_folder": cfg.task_folder(task), "dataset": cfg.dataset, "sequence": cfg.sequence,
            "layout": "ood" if cfg.ood_site else "id", "target_size": SLICE_SIZE,
        }
        cases: dict[str, dict] = {}
        slices: dict[str, dict] = {}
        for res in results_of_task:
            cases[res.case] = res.entries[task]
            slices.update(res.slices[task])
        path = cfg.meta_dir(task) / META_FILE
        write_meta(path, header, cases, slices)
        written.append(path)
    return written


# --------------------------------------------------------------------------- batch conversion


def split_cases(cases: Iterable[str], finetune_fraction: float, seed: int = 0) -> dict[str, str]:
    """Per-case OOD split: ``round(fraction * n)`` seeded-random cases -> ``finetune``, rest ``inference``.

    With 0 < fraction < 1 and at least two cases, each side gets at least one case.
    """
    ids = sorted(set(cases))
    n_ft = int(math.floor(finetune_fraction * len(ids) + 0.5))
    if 0.0 < finetune_fraction < 1.0 and len(ids) >= 2:
        n_ft = min(max(n_ft, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i]: (FINETUNE if rank < n_ft else INFERENCE) for rank, i in enumerate(order)}


@dataclass
class ConversionSummary:
    """Outcome of a batch: converted cases, slices per task folder, counted skips."""

    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    slices: dict[str, int] = field(default_factory=dict)           # task folder -> slices written
    absent: dict[str, int] = field(default_factory=dict)           # task folder -> cases without it
    splits: dict[str, str] = field(default_factory=dict)           # case -> split (OOD site)
    meta_files: list[str] = field(default_factory=list)

    def count(self, res: CaseResult, cfg: ConvertConfig) -> None:
        """Add a converted case."""
        self.converted.append(res.case)
        if cfg.ood_site:
            self.splits[res.case] = res.split
        for task, names in res.slices.items():
            folder = cfg.task_folder(task)
            self.slices[folder] = self.slices.get(folder, 0) + len(names)
        for task in res.absent:
            folder = cfg.task_folder(task)
            self.absent[folder] = self.absent.get(folder, 0) + 1

    def describe(self) -> str:
        lines = [f"converted {len(self.converted)} case(s), skipped {len(self.skipped)}"]
        lines += [f"  {task}: {n} slice(s)" + (f", absent in {self.absent[task]} case(s)" if self.absent.get(task) else "")
                  for task, n in sorted(self.slices.items())]
        if self.splits:
            n_ft = sum(s == FINETUNE for s in self.splits.values())
            lines.append(f"  split: {n_ft} finetune / {len(self.splits) - n_ft} inference case(s)")
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def convert_dataset(images: str | Path, labels: str | Path, cfg: ConvertConfig,
                    strict: bool = False, progress: bool = True) -> ConversionSummary:
    """Convert every image/label pair; unreadable or mismatched cases are skipped and counted.

    With ``strict`` the first bad case raises :class:`ConversionError` instead. Raises
    :class:`ConversionError` too when no case at all could be converted. ``progress`` shows a bar
    on stderr, one step per case.
    """
    pairs, missing = pair_inputs(images, labels)
    summary = ConversionSummary()
    for path, reason in missing:
        if strict:
            raise ConversionError(reason)
        logger.warning("skip: %s", reason)
        summary.skipped.append((path, reason))
    case_of: dict[Path, str] = {}
    if cfg.case_ids == "index":
        width = max(3, len(str(len(pairs))))
        case_of = {image: str(i).zfill(width) for i, (image, _) in enumerate(sorted(pairs))}
    else:
        seen: dict[str, Path] = {}
        for image, _ in pairs:
            case = case_id_from_path(image)
            if case in seen:
                raise ConversionError(f"{image}: case id {case!r} already used by {seen[case]}")
            seen[case] = image
            case_of[image] = case
    splits = split_cases(case_of.values(), cfg.finetune_fraction, cfg.seed) if cfg.ood_site else {}
    results: list[CaseResult] = []
    bar = tqdm(pairs, desc="converting", unit="case", disable=not progress, dynamic_ncols=True)
    # log lines (a skipped case) are printed above the bar instead of through it
    with logging_redirect_tqdm() if progress else contextlib.nullcontext():
        try:
            for image, label in bar:
                case = case_of[image]
                bar.set_postfix_str(case, refresh=False)
                try:
                    res = convert_case(image, label, cfg, case=case, split=splits.get(case))
                except ConversionError as err:
                    if strict:
                        raise
                    logger.warning("skip: %s", err)
                    summary.skipped.append((str(image), str(err)))
                    continue
                results.append(res)
                summary.count(res, cfg)
        finally:
            bar.close()
            # written slices stay described even when a strict run stops half-way
            summary.meta_files = [str(p) for p in update_meta(cfg, results)]
    logger.info("converted %d case(s), skipped %d", len(summary.converted), len(summary.skipped))
    if not summary.converted:
        raise ConversionError(f"no case converted from {images} ({len(summary.skipped)} skipped):\n"
                              + summary.describe())
    return summary
