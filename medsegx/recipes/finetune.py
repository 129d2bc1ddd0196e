"""Fine-tuning (finetune.py, ``medsegx finetune``): one run per OOD site and data ratio, zero-shot vs fine-tuned."""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .. import runtime
from ..checkpointer import LATEST, RESULT, RunFolderError, RunLock, holds_run
from ..data.catalog import open_catalog, problem_summary
from ..data.dataset import MedSegDataset
from ..data.layout import FINETUNE, INFERENCE
from ..engine import evaluate, make_eval_loader, mean_dsc
from ..errors import UserError
from ..fileio import atomic_write_set, atomic_write_text, ensure_writable_dir
from ..model.checkpoint import atomic_save, checkpoint_state, torch_load
from ..model.config import default_select
from ..selection import ORACLE
from .common import model_from_args, train_run

FINAL = "model_final.pth"  # what a (site, ratio) run ships

logger = logging.getLogger(__name__)


def _score(args: argparse.Namespace, records: Any, weights: str | Path | None) -> dict[str, float]:
    """Mean DSC (the backbone's default selection, :func:`_selection`, and the honest IoU selection) of
    ``weights`` on ``records``."""
    info = runtime.dist_info()
    model = model_from_args(args, info.device, weights, for_training=False)
    dataset = MedSegDataset(records, train=False, seed=args.seed, strict=args.strict)
    loader = make_eval_loader(dataset, args.val_batch_size or max(1, args.batch_size // info.world_size),
                              args.num_workers)
    results = evaluate(model, loader, device=info.device, amp=args.use_amp, amp_dtype=args.amp_dtype,
                       select=_selection(args), metrics=("dsc",), desc="test")
    del model
    return {"dsc": mean_dsc(results), "dsc_iou": mean_dsc(results, "dsc_iou"), "n": len(results)}


def _selection(args: argparse.Namespace) -> str:
    """The selection the summary's numbers use: the evaluation default of the backbone (SAM: the paper's oracle)."""
    return default_select(args.model_type, evaluation=True)


def plan_sites(args: argparse.Namespace, catalog: Any) -> list[dict[str, Any]]:
    """Every site to fine-tune with its slices (training pool, validation, test), checked before any work."""
    finetune_all = catalog.select(subset=FINETUNE)
    sites = list(dict.fromkeys(folder.group_key for folder in finetune_all.folders))
    if args.sites:
        wanted = set(args.sites)
        unknown = wanted - {"/".join(s) for s in sites}
        if unknown:
            raise UserError(f"--sites {' '.join(sorted(unknown))}: no such site under {args.data_path} "
                            f"({args.shift_type}); sites: {', '.join('/'.join(s) for s in sites) or 'none'}")
        sites = [s for s in sites if "/".join(s) in wanted]
    if not sites:
        raise UserError(f"no fine-tuning site (a finetune/ folder with usable slices) under {args.data_path} "
                        f"for {args.shift_type}{problem_summary(catalog)}")
    plans = []
    for key in sites:
        site = "/".join(key)
        ft = finetune_all.select(where=lambda f, key=key: f.group_key == key)
        test = catalog.select(subset=INFERENCE, where=lambda f, key=key: f.group_key == key)
        if args.validation == "val":
            train_pool, val = ft.train_val_split(0.2, seed=args.seed)
        else:
            train_pool, val = ft, test
        if not len(test):
            logger.warning("%s has no inference/ slices: it is scored on its validation split", site)
            test = val
        if not len(test):
            raise UserError(f"{site}: no slice to score the fine-tuned model on (neither inference/ nor a "
                            "validation split: the site has a single case)")
        plans.append({"key": key, "site": site, "train_pool": train_pool, "val": val, "test": test})
    return plans


def _previous_results(output_dir: Path) -> list[str]:
    found = [name for name in ("summary.md", "summary.csv") if (output_dir / name).exists()]
    found += sorted(str(p.relative_to(output_dir)) for p in output_dir.glob("**/ratio_*") if holds_run(p))
    return found


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """finetune.py: fine-tune every site of --data_path at every --data_ratio, from --resume's weights.

    Each (site, ratio) is its own run folder, ``<work_dir>/<task_name>/<shift_type>/<Task>/<Dataset>
    [/<Sequence>]/ratio_<r>/``, scored on the site's inference/ slices with the checkpoint that run
    chose; ``--continue`` keeps finished runs (their ``result.json``) and resumes the interrupted one.
    """
    output_dir = Path(args.work_dir) / args.task_name / args.shift_type
    info = runtime.setup(args, None)
    catalog = open_catalog(args.data_path, args.shift_type, strict=args.strict, refresh=args.refresh_index)
    plans = plan_sites(args, catalog)
    init = torch_load(args.resume) if args.resume else None  # read once, used by every site and ratio
    lock = RunLock(output_dir)
    if info.is_main:
        ensure_writable_dir(output_dir, "fine-tuning output folder")
        lock.acquire()
    try:
        if info.is_main and not args.resume_run and not args.overwrite:
            previous = _previous_results(output_dir)
            if previous:
                raise RunFolderError(f"{output_dir} already holds fine-tuning results ({', '.join(previous[:4])}); "
                                     "continue them with --continue or replace them with --overwrite")
        runtime.barrier()
        runtime.add_log_file(output_dir)
        runtime.write_run_info(args, output_dir)
        rows = [row for plan in plans for row in _finetune_site(args, plan, init, output_dir)]
        if info.is_main:
            write_summary(rows, output_dir, args)
    finally:
        lock.release()
    runtime.cleanup_distributed()
    return rows


def _finetune_site(args: argparse.Namespace, plan: dict[str, Any], init: Any, output_dir: Path) -> list[dict]:
    """Every data ratio of one site: train, then ship the better of the fine-tuned model and its starting
    point by the site's validation split (``model_final.pth``), and score all of them on its test slices."""
    site, test, val = plan["site"], plan["test"], plan["val"]
    start = _score(args, test, init)  # the pre-trained model, zero-shot
    backbone = _score(args, test, None) if init is not None else start  # adapters at zero
    start_val = _score(args, val, init) if len(val) else None
    logger.info("%s zero-shot DSC %.4f (backbone alone %.4f) on %d slices", site, start["dsc"], backbone["dsc"],
                start["n"])
    rows = []
    for ratio in args.data_ratio:
        run_dir = output_dir.joinpath(*plan["key"]) / f"ratio_{ratio:g}"
        result_file = run_dir / RESULT
        if args.resume_run and result_file.is_file():
            rows.append(json.loads(result_file.read_text(encoding="utf-8")))
            logger.info("%s ratio %g: finished earlier, kept (%s)", site, ratio, result_file)
            continue
        resume = run_dir / LATEST if args.resume_run and (run_dir / LATEST).is_file() else None
        train = plan["train_pool"].subset(ratio, seed=args.seed)
        logger.info("%s ratio %g: %d training slices, %d validation%s", site, ratio, len(train), len(val),
                    f"; resuming {resume}" if resume else "")
        result = train_run(args, train, val, run_dir, init_weights=init, resume=resume)
        trained = result["files"]["best"] or result["files"]["latest"]
        tuned = _score(args, test, trained)
        tuned_val = _score(args, val, trained) if start_val is not None else None
        keep_start = tuned_val is not None and tuned_val["dsc"] < start_val["dsc"]
        if keep_start:
            why = (f"validation DSC {tuned_val['dsc']:.4f} after fine-tuning < {start_val['dsc']:.4f} of the starting "
                   "point: the starting weights are kept")
        elif tuned_val is not None:
            why = f"validation DSC {tuned_val['dsc']:.4f} after fine-tuning >= {start_val['dsc']:.4f} of the starting point"
        else:
            why = "no validation split (a single case): the fine-tuned model is kept unchecked"
        final = run_dir / FINAL
        if runtime.is_main_process():
            atomic_save(_final_state(init, trained, keep_start, args), final)
        shipped = start if keep_start else tuned
        row = {"site": site, "ratio": ratio, "train_slices": len(train), "test_slices": tuned["n"],
               "backbone_dsc": backbone["dsc"], "zero_shot_dsc": start["dsc"], "finetuned_dsc": tuned["dsc"],
               "kept": "start" if keep_start else "fine-tuned", "final_dsc": shipped["dsc"],
               "backbone_dsc_iou": backbone["dsc_iou"], "zero_shot_dsc_iou": start["dsc_iou"],
               "finetuned_dsc_iou": tuned["dsc_iou"], "final_dsc_iou": shipped["dsc_iou"],
               "val_start_dsc": start_val["dsc"] if start_val else None,
               "val_finetuned_dsc": tuned_val["dsc"] if tuned_val else None,
               "why": why, "trained_checkpoint": str(trained), "checkpoint": str(final)}
        if runtime.is_main_process():
            atomic_write_text(result_file, json.dumps(row, indent=1) + "\n")
        rows.append(row)
        logger.info("%s ratio %g: zero-shot %.4f -> fine-tuned %.4f; %s", site, ratio, start["dsc"], tuned["dsc"], why)
    return rows


def _final_state(init: Any, trained: Path, keep_start: bool, args: argparse.Namespace) -> dict[str, Any]:
    """What ``model_final.pth`` holds: the fine-tuned weights, or the starting ones when validation says so."""
    if not keep_start:
        return dict(torch_load(trained))
    if init is not None:
        return {**dict(init), "optimizer": None, "kept": "start"}
    model = model_from_args(args, torch.device("cpu"), None, for_training=False)  # the backbone, adapters at zero
    return checkpoint_state(model, kept="start")


def write_summary(rows: list[dict[str, Any]], output_dir: Path, args: argparse.Namespace) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    lines = [f"# fine-tuning summary ({args.shift_type}, {args.model_type})", "",
             f"Test split: inference/; validation: {args.validation} (by case). Mean DSC, {_selection(args)} selection"
             + (" (the paper's)" if _selection(args) == ORACLE else " (label-free)")
             + "; in brackets the label-free IoU-head selection. Backbone: adapters at zero; zero-shot: the "
             "starting weights (--resume); fine-tuned: the run's chosen checkpoint; final: model_final.pth, the "
             "better of fine-tuned and starting point on the validation split.", "",
             "| site | data ratio | train slices | test slices | backbone | zero-shot | fine-tuned | kept | final | "
             "change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['site']} | {r['ratio']:g} | {r['train_slices']} | {r['test_slices']} | "
                     f"{r['backbone_dsc']:.4f} ({r['backbone_dsc_iou']:.4f}) | "
                     f"{r['zero_shot_dsc']:.4f} ({r['zero_shot_dsc_iou']:.4f}) | "
                     f"{r['finetuned_dsc']:.4f} ({r['finetuned_dsc_iou']:.4f}) | {r['kept']} | "
                     f"{r['final_dsc']:.4f} ({r['final_dsc_iou']:.4f}) | {r['final_dsc'] - r['zero_shot_dsc']:+.4f} |")
    lines += ["", "Why each run kept what it kept:", ""]
    lines += [f"- {r['site']} ratio {r['ratio']:g}: {r['why']}" for r in rows]
    atomic_write_set({output_dir / "summary.csv": buf.getvalue(), output_dir / "summary.md": "\n".join(lines) + "\n"})
    logger.info("summary: %s", output_dir / "summary.md")


__all__ = ["plan_sites", "run", "write_summary"]
