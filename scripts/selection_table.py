"""The table of scripts/reproduce-selection.sh: per held-out set, the mean DSC of every fixed output, the
oracle and every label-free rule, and how the default rule stands against the best fixed output.

    python scripts/selection_table.py playground/selection [--default RULE]

Reads each set's ``*_outputs.csv`` (written by the evaluation beside its details report: per slice the DSC
of every output and of every selection mode's choice) and prints Markdown. Nothing is recomputed here:
the numbers are the evaluation's.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.model.config import LITE_SELECT  # noqa: E402
from medsegx.selection import LABEL_FREE_MODES  # noqa: E402

# (title, report folder under OUT): the order of the table; sets whose report is missing are left out.
SETS = [
    ("eval/ID (MedSegDB-real, the trained tasks)", "ID"),
    ("CT organs of the shared volume (held out)", "CTorgans"),
    ("CT liver of the shared volume (a trained task of the recipes)", "CTliver"),
    ("HC18 fetal head (cross-task)", "HC18"),
    ("HAM10000 skin (cross-site)", "HAM10000"),
    ("MedSegDB-example eval/ID", "example-ID"),
    ("MedSegDB-example OOD cross-site (prostate MRI)", "example-OOD-site"),
    ("MedSegDB-example OOD cross-task (colon cancer CT)", "example-OOD-task"),
    ("MedSegDB-example RealWorld cross-site (consolidation CT)", "example-RealWorld-site"),
    ("MedSegDB-example RealWorld cross-task (stomach cancer CT)", "example-RealWorld-task"),
]
TOLERANCE = 0.005  # the default may sit this far below the best fixed output (issue 20)


def read_outputs(path: Path) -> tuple[int, dict[str, float]]:
    """(N slices, column -> mean over slices) of an ``*_outputs.csv``: ``DSC_<k>`` per output, ``DSC_<mode>``."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "DSC_oracle" not in rows[0]:
        raise ValueError(f"{path}: not an outputs report (no DSC_oracle column)")
    means = {}
    for column in rows[0]:
        if column.startswith("DSC_"):
            values = [float(r[column]) for r in rows if r[column] not in ("", "nan")]
            means[column[4:]] = sum(values) / len(values) if values else math.nan
    return len(rows), means


def load(out: Path) -> list[tuple[str, int, dict[str, float]]]:
    sets = []
    for title, folder in SETS:
        found = sorted((out / folder).rglob("*_outputs.csv"))
        if len(found) > 1:
            raise ValueError(f"{out / folder}: several outputs reports {[str(p) for p in found]}")
        if found:
            sets.append((title, *read_outputs(found[0])))
    return sets


def table(sets: list[tuple[str, int, dict[str, float]]], default: str) -> str:
    if not sets:
        raise ValueError("no outputs report found")
    k = max(sum(1 for key in means if key.isdigit()) for _, _, means in sets)
    modes = [m for m in LABEL_FREE_MODES if all(m in means for _, _, means in sets)]
    if default not in modes:
        raise ValueError(f"the default {default!r} was not scored on every set (scored: {modes})")
    head = (["set", "N", "oracle"] + [f"token {i}" for i in range(k)]
            + [f"**{m}**" if m == default else m for m in modes] + ["best fixed", f"{default} - best fixed"])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    worst = []
    for title, n, means in sets:
        fixed = [means.get(str(i), math.nan) for i in range(k)]
        best = max(range(k), key=lambda i: -math.inf if math.isnan(fixed[i]) else fixed[i])
        margin = means[default] - fixed[best]
        worst.append((margin, title))
        cells = [title, str(n), f"{means['oracle']:.4f}"] + [f"{v:.4f}" for v in fixed] + \
                [f"{means[m]:.4f}" for m in modes] + [f"token {best}", f"{margin:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    margin, title = min(worst)
    verdict = ("within" if margin >= -TOLERANCE else "NOT within") + \
        f" {TOLERANCE} of the best fixed output on every set (lowest: {margin:+.4f}, {title})"
    return "\n".join(lines) + f"\n\nDefault `{default}`: {verdict}.\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="playground/selection", help="the study's folder")
    p.add_argument("--default", default=LITE_SELECT, choices=LABEL_FREE_MODES, help="the rule checked")
    args = p.parse_args(argv)
    return table(load(Path(args.out)), args.default)


if __name__ == "__main__":
    sys.stdout.write(main())
