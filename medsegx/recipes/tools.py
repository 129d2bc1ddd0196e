"""Small tools (``medsegx params``, ``medsegx compare``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio import atomic_write_text


def params(args: argparse.Namespace) -> None:
    """Print the trainable parameters of a model type by part (no checkpoint needed: SAM's own init)."""
    from ..model.build import build_model, build_sam256
    from ..model.config import model_config
    from ..model.freeze import apply_freeze_policy, count_parameters

    if args.model_type == "lite":
        model = build_model("lite", train_iou_head=args.train_iou_head)
    else:
        model = build_sam256(model_config(args.model_type))
        apply_freeze_policy(model, train_iou_head=args.train_iou_head)
    counts = count_parameters(model)
    print(f"{args.model_type}: trainable parameters by part")
    for key in ("adapters", "context_embeddings", "mask_decoder", "trainable", "frozen", "total"):
        if key in counts:
            print(f"  {key:<20} {counts[key]:>13,}")


def compare(args: argparse.Namespace) -> None:
    """Print (and with --out write) the per-task DSC of two published-format report CSVs."""
    from ..reports import compare_reports

    table = compare_reports(Path(args.a), Path(args.b), tuple(args.labels), args.external)
    if args.out:
        atomic_write_text(args.out, (f"# {args.title}\n\n" if args.title else "") + table)
    sys.stdout.write(table)
