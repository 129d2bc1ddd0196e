"""The table of scripts/reproduce-generalisation.sh: mean DSC per set, recipe and selection, over seeds.

    python scripts/generalisation_table.py playground/generalisation

Reads each run's ``*_details.md`` (the scored DSC, i.e. the evaluation's ``--select``, and the DSC (iou)
columns of its ALL and per-task rows) and prints Markdown: per set, zero-shot LiteMedSAM and every recipe
as mean +- standard deviation over the seeds (scored / IoU head), and the change against zero-shot.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from the source tree, uninstalled
from medsegx.selection import LABEL_FREE_MODES, ORACLE  # noqa: E402

SETS = [("ID (trained tasks)", "ID/internal/ID_details.md"), ("CT organs (held out)", "CTorgans/internal/ID_details.md"),
        ("HC18 fetal head (cross-task)", "OOD/external/OOD-task_details.md"),
        ("HAM10000 skin (cross-site)", "OOD/external/OOD-site_details.md")]


def read_details(path: Path) -> dict[str, tuple[float, float, int]]:
    """task (and "ALL") -> (mean DSC scored, mean DSC iou, N) from a details report (scored: the output its
    ``--select`` chose; for lite the label-free default, for SAM the paper's oracle)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Per task")
    header = [c.strip() for c in lines[start + 2].split("|")]
    col = {name: i for i, name in enumerate(header)}
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")]
        scored = next(i for name, i in col.items() if name.startswith("DSC (scored"))
        rows[cells[1]] = (float(cells[scored].split()[0]), float(cells[col["DSC (iou)"]].split()[0]),
                          int(cells[2]))
    return rows


def read_choices(path: Path) -> dict[str, float]:
    """selection mode -> mean DSC over all slices, from the details report's "Output choice" table (every
    label-free rule and the oracle; empty for a report without it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if "## Output choice" not in lines:
        return {}
    start = lines.index("## Output choice")
    header_at = next(i for i in range(start, len(lines)) if lines[i].startswith("| task |"))
    header = [c.strip().removesuffix(" (scored)") for c in lines[header_at].split("|")]
    for line in lines[header_at + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")]
        if cells[1] == "ALL":
            return {name: float(cells[i]) for i, name in enumerate(header)
                    if name in (*LABEL_FREE_MODES, ORACLE) and i < len(cells)}
    return {}


def against_best_label_free(out: Path) -> list[str]:
    """The issue's comparison: each recipe under each label-free rule against zero-shot LiteMedSAM under its
    best label-free rule on that set (chosen per set, so an upper bound for zero-shot)."""
    zero = out / "zero-shot"
    recipes = sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ("zero-shot", "heldout", "prefix-cache"))
    rows, titles, best = [], [], []
    for title, rel in SETS:
        if not (zero / rel).is_file():
            continue
        choices = read_choices(zero / rel)
        if not choices:
            return []
        name, value = max(((m, v) for m, v in choices.items() if m != "oracle"), key=lambda kv: kv[1])
        titles.append((title, rel))
        best.append((name, value, choices))
    if not titles:
        return []
    lines = ["## Against the best label-free zero-shot (per set, the rule chosen on the set itself)", "",
             "| model | rule | seeds | " + " | ".join(t for t, _ in titles) + " |", "|---|---|---|" + "---|" * len(titles),
             "| zero-shot LiteMedSAM | best on the set | - | "
             + " | ".join(f"{v:.4f} ({n})" for n, v, _ in best) + " |"]
    for rule in ("first", "first_consensus", "first_confident"):
        lines.append(f"| zero-shot LiteMedSAM | {rule} | - | "
                     + " | ".join(f"{c.get(rule, float('nan')):.4f} ({c.get(rule, float('nan')) - v:+.4f})"
                                  for _, v, c in best) + " |")
    for recipe in recipes:
        seeds = sorted(recipe.glob("seed*"))
        for rule in ("first", "first_consensus", "first_confident"):
            cells, n = [], 0
            for (_, rel), (_, value, _) in zip(titles, best, strict=True):
                values = [read_choices(p / "scores" / rel).get(rule) for p in seeds if (p / "scores" / rel).is_file()]
                values = [v for v in values if v is not None]
                n = max(n, len(values))
                cells.append(f"{fmt(values)} ({statistics.mean(values) - value:+.4f})" if values else "-")
            if n:
                rows.append(f"| {recipe.name} | {rule} | {n} | " + " | ".join(cells) + " |")
    return lines + rows + ["", "(change against the best label-free zero-shot of the set in brackets)", ""]


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


Details = dict[str, tuple[float, float, int]]


def load(out: Path) -> list[tuple[str, Details, dict[str, list[Details]]]]:
    """Each set with a zero-shot report: (title, zero-shot details, recipe -> the details of its scored seeds)."""
    zero = out / "zero-shot"
    recipes = sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ("zero-shot", "heldout", "prefix-cache"))
    loaded = []
    for title, rel in SETS:
        if not (zero / rel).is_file():
            continue
        runs = {recipe.name: [read_details(p / "scores" / rel) for p in sorted(recipe.glob("seed*"))
                              if (p / "scores" / rel).is_file()] for recipe in recipes}
        loaded.append((title, read_details(zero / rel), {name: r for name, r in runs.items() if r}))
    return loaded


def summary(sets: list[tuple[str, Details, dict[str, list[Details]]]]) -> list[str]:
    """One row per model, one column per set: mean DSC (scored) +- spread over seeds, change vs zero-shot."""
    if not sets:
        return []
    lines = ["## Summary (mean DSC over each set's slices; change against zero-shot LiteMedSAM)", "",
             "| model | seeds | " + " | ".join(f"{title}, N={base['ALL'][2]}" for title, base, _ in sets) + " |",
             "|---|---|" + "---|" * len(sets),
             "| zero-shot LiteMedSAM | - | " + " | ".join(f"{base['ALL'][0]:.4f}" for _, base, _ in sets) + " |"]
    for name in sorted({name for _, _, runs in sets for name in runs}):
        cells = []
        for _, base, runs in sets:
            values = [r["ALL"][0] for r in runs.get(name, [])]
            cells.append(f"{fmt(values)} ({statistics.mean(values) - base['ALL'][0]:+.4f})" if values else "-")
        seeds = max(len(runs.get(name, [])) for _, _, runs in sets)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(out: Path) -> str:
    sets = load(out)
    lines = [f"# Generalisation study ({out})", "",
             "Mean DSC over the set's slices; recipes: mean ± standard deviation over seeds. scored = the output "
             "the evaluation's --select chose (lite: its label-free default; SAM: the paper's oracle, best by the "
             "label); label-free = the IoU head's choice.", ""]
    lines += summary(sets)
    lines += against_best_label_free(out)
    for title, base, recipe_runs in sets:
        lines += [f"## {title}", "", "| model | seeds | N | scored | label-free | change (scored) | change (label-free) |",
                  "|---|---|---|---|---|---|---|",
                  f"| zero-shot LiteMedSAM | - | {base['ALL'][2]} | {base['ALL'][0]:.4f} | {base['ALL'][1]:.4f} | | |"]
        per_task_rows = []
        for name, runs in recipe_runs.items():
            oracle = [r["ALL"][0] for r in runs]
            free = [r["ALL"][1] for r in runs]
            lines.append(f"| {name} | {len(runs)} | {runs[0]['ALL'][2]} | {fmt(oracle)} | {fmt(free)} | "
                         f"{statistics.mean(oracle) - base['ALL'][0]:+.4f} | {statistics.mean(free) - base['ALL'][1]:+.4f} |")
            for task in sorted(t for t in base if t != "ALL"):
                values = [r[task][0] for r in runs if task in r]
                per_task_rows.append(f"| {task} | {name} | {base[task][0]:.4f} | {fmt(values)} | "
                                     f"{statistics.mean(values) - base[task][0]:+.4f} |")
        lines += ["", "| task | recipe | zero-shot | recipe (scored) | change |", "|---|---|---|---|---|", *per_task_rows, ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1] if len(sys.argv) > 1 else "playground/generalisation")))
