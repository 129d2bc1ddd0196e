"""``medsegx`` command: small tools around the scripts.

    medsegx params --model_type vit_b            trainable parameters by part (no checkpoint needed)
    medsegx compare A.csv B.csv --labels zero-shot ConMoAE [--out table.md]
                                                 per-task DSC of two published-format reports
    medsegx predict -i ct.nii.gz -o out/ --modality CT --task Liver --box 40 30 5 90 80 25 --model_type lite
                                                 segment your own scans (the parser of predict.py)
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _params(args: argparse.Namespace) -> None:
    from .model import count_parameters
    from .model.build import apply_freeze_policy, build_sam256, model_config

    if args.model_type == "lite":
        from .model import build_model

        model = build_model("lite")
    else:
        model = build_sam256(model_config(args.model_type))
        apply_freeze_policy(model, train_iou_head=args.train_iou_head)
    counts = count_parameters(model)
    print(f"{args.model_type}: trainable parameters by part")
    for key in ("adapters", "context_embeddings", "mask_decoder", "trainable", "frozen", "total"):
        if key in counts:
            print(f"  {key:<20} {counts[key]:>13,}")


def task_of(file_key: str, external: bool) -> str:
    """The task of a report row: ``Dataset/Task/..`` (ID) or ``Task/Dataset/..`` (external)."""
    parts = file_key.split("/")
    return parts[0] if external else parts[1]


def read_report_csv(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {row["File"]: float(row["DSC"]) for row in csv.DictReader(f)}


def compare_reports(a: Path, b: Path, labels: tuple[str, str], external: bool) -> str:
    """Markdown table of mean DSC per task for two reports over the same slices."""
    da, db = read_report_csv(a), read_report_csv(b)
    common = sorted(set(da) & set(db))
    if not common:
        raise SystemExit(f"{a} and {b} share no slice")
    per_task: dict[str, list[str]] = defaultdict(list)
    for key in common:
        per_task[task_of(key, external)].append(key)
    lines = [f"| task | N | {labels[0]} DSC | {labels[1]} DSC | change |", "|---|---|---|---|---|"]
    for task, keys in sorted(per_task.items()) + [("ALL (mean over slices)", common)]:
        ma, mb = np.mean([da[k] for k in keys]), np.mean([db[k] for k in keys])
        lines.append(f"| {task} | {len(keys)} | {ma:.4f} | {mb:.4f} | {mb - ma:+.4f} |")
    return "\n".join(lines) + "\n"


def _compare(args: argparse.Namespace) -> None:
    table = compare_reports(Path(args.a), Path(args.b), tuple(args.labels), args.external)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text((f"# {args.title}\n\n" if args.title else "") + table, encoding="utf-8")
    sys.stdout.write(table)


def _predict(args: argparse.Namespace) -> None:
    from . import runtime
    from .inference.cli import main as predict

    runtime.launch(predict, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medsegx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="trainable parameter count of a model type")
    p.add_argument("--model_type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny", "lite"])
    p.add_argument("--train_iou_head", action="store_true")
    p.set_defaults(func=_params)
    c = sub.add_parser("compare", help="per-task DSC of two report CSVs")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--labels", nargs=2, default=["A", "B"])
    c.add_argument("--external", action="store_true", help="rows are Task/Dataset/.. (external reports)")
    c.add_argument("--title", default=None)
    c.add_argument("--out", default=None)
    c.set_defaults(func=_compare)
    from .inference.cli import get_args_parser as predict_parser

    sub.add_parser("predict", parents=[predict_parser(add_help=False)], help="segment your own scans with box prompts",
                   description=predict_parser().description,
                   formatter_class=argparse.RawDescriptionHelpFormatter).set_defaults(func=_predict)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
