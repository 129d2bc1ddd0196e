"""Evaluation (evaluate_internal.py / evaluate_external.py, ``medsegx evaluate-internal|external``).

Internal and external evaluation differ only in the slices they walk (eval/ID
versus the inference/ folders of eval/OOD|RealWorld/<shift_type>); both go
through :func:`medsegx.engine.evaluate` and :mod:`medsegx.reports`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .. import reports, runtime
from ..data.catalog import describe_problems, open_catalog, problem_summary
from ..data.dataset import MedSegDataset
from ..data.layout import EXTERNAL, ID, INFERENCE, INTERNAL, SHIFT_TYPES, external_stem
from ..data.meta import slice_spacing
from ..engine import evaluate, make_eval_loader
from ..errors import UserError
from ..fileio import ensure_writable_dir
from ..selection import ORACLE
from .common import model_from_args

logger = logging.getLogger(__name__)


def report_name(data_path: str | Path, shift_type: str | None) -> tuple[str, str, str]:
    """(sub-folder, file stem, Markdown title) as published: internal/ID, external/<split>-<site|task>."""
    if shift_type is None:
        return INTERNAL, ID, reports.internal_title()
    split = Path(data_path).resolve().name
    if split in SHIFT_TYPES:
        split = Path(data_path).resolve().parent.name
    return EXTERNAL, external_stem(split, shift_type), reports.external_title(shift_type)


def output_dir_for(args: argparse.Namespace, sub: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir) / sub
    if args.model_weight:
        return Path(args.model_weight).resolve().parent / sub
    # The backbone alone (adapters at zero): its reports go to a folder named after it.
    return Path("playground") / f"baseline-{args.model_type}" / sub


def run_internal(args: argparse.Namespace) -> list[dict[str, Any]]:
    """evaluate_internal.py: every slice of eval/ID, walked dataset -> task -> [sequence]."""
    return run(args, external=False)


def run_external(args: argparse.Namespace) -> list[dict[str, Any]]:
    """evaluate_external.py: the inference/ slices of eval/OOD|RealWorld/<shift_type>."""
    return run(args, external=True)


def run(args: argparse.Namespace, external: bool) -> list[dict[str, Any]]:
    """Score every slice with the model of ``args`` and write the published and the extra reports."""
    shift_type = args.shift_type if external else None
    sub, stem, title = report_name(args.data_path, shift_type)
    out_dir = output_dir_for(args, sub)
    info = runtime.setup(args, None)

    catalog = open_catalog(args.data_path, shift_type, strict=args.strict, refresh=args.refresh_index)
    if external:
        catalog = catalog.select(subset=INFERENCE)
    if not len(catalog):
        raise UserError(f"no usable slice to evaluate under {args.data_path}"
                        + (f" ({shift_type}, inference/)" if external else "") + problem_summary(catalog))
    if runtime.is_main_process():
        ensure_writable_dir(out_dir, "report folder")  # before the work, not after it

    model = model_from_args(args, info.device, args.model_weight, for_training=False).eval()
    baseline_note = None
    if args.model_weight is None:
        baseline_note = (f"No --model_weight: the {args.model_type} backbone alone (ConMoAE adapters at "
                         "their initial zero state, mask decoder as in the base checkpoint).")
        logger.warning(baseline_note)

    dataset = MedSegDataset(catalog, train=False)
    per_rank = max(1, args.batch_size // info.world_size)
    loader = make_eval_loader(dataset, per_rank, args.num_workers)
    gallery: list[dict[str, Any]] = []
    results = evaluate(model, loader, device=info.device, amp=args.use_amp, amp_dtype=args.amp_dtype,
                       select=args.select, metrics=args.metric, nsd_tolerance=args.nsd_tolerance,
                       spacing=lambda i: slice_spacing(catalog[i].image_path), keep_worst=args.gallery, gallery=gallery,
                       desc=stem)
    if runtime.is_main_process():
        slices = [to_slice_result(r, catalog[r["index"]]) for r in results]
        notes = []
        if baseline_note:
            notes.append(baseline_note)
        if args.select != ORACLE:
            notes.append(f"Selection: --select {args.select} (the published tables use oracle selection).")
        problems = getattr(catalog, "problems", None)
        if problems:
            notes.append(f"Bad files skipped while indexing ({len(problems)}):\n\n" + describe_problems(problems, 20))
        paths = reports.write_report(slices, out_dir, stem, title, layout=sub, gallery=gallery, notes=notes)
        runtime.write_run_info(args, out_dir, name=f"{stem}_run_info.json")
        logger.info("reports: %s", ", ".join(str(p) for p in paths.values()))
    runtime.cleanup_distributed()
    return results


def to_slice_result(r: dict[str, Any], record: Any) -> reports.SliceResult:
    """An engine result as a report row (group and case from the catalog record)."""
    return reports.SliceResult(
        name=r["name"], dsc=r["dsc"], hd=r["hd"], select=r["select"], group=record.group_key, nsd=r.get("nsd"),
        dsc_oracle=r["dsc_oracle"], dsc_iou=r["dsc_iou"], dsc_first=r["dsc_first"], hd95_mm=r.get("hd_mm"),
        case=record.case_id,
        intersection=r["intersection"], pred_size=r["pred_size"], gt_size=r["gt_size"],
        skipped=r.get("skipped"), index=r["index"], dsc_outputs=r.get("dsc_all"),
        dsc_modes={m: r[f"dsc_{m}"] for m in r["modes"]} if "modes" in r else None, output_scores=r.get("scores"))
