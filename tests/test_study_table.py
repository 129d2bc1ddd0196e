"""scripts/generalisation_table.py: means and spreads over seeds, changes against zero-shot, from the
details reports the evaluation writes (their "Per task" table)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _table_module():
    spec = importlib.util.spec_from_file_location("generalisation_table", REPO / "scripts" / "generalisation_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _details(path: Path, rows: dict[str, tuple[float, float, int]]) -> None:
    lines = ["# details", "", "x", "", "## Per task", "",
             "| task | N | DSC (scored: oracle) | DSC (oracle) | DSC (iou) | DSC (first) | oracle - iou |",
             "|---|---:|---|---|---|---|---:|"]
    for task, (oracle, iou, n) in rows.items():
        lines.append(f"| {task} | {n} | {oracle:.4f} ± 0.1 | {oracle:.4f} ± 0.1 | {iou:.4f} ± 0.2 | 0.5 ± 0.1 | "
                     f"{oracle - iou:+.4f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + ["", "## Per group", ""]), encoding="utf-8")


def test_summary_and_per_task_rows(tmp_path):
    table = _table_module()
    rel = "ID/internal/ID_details.md"
    _details(tmp_path / "zero-shot" / rel, {"CT_Liver": (0.8, 0.8, 4), "ALL": (0.7, 0.6, 10)})
    for seed, (liver, overall) in enumerate([(0.9, 0.75), (0.7, 0.85)]):
        _details(tmp_path / "lrsplit" / f"seed{seed}" / "scores" / rel,
                 {"CT_Liver": (liver, liver, 4), "ALL": (overall, overall - 0.1, 10)})
    (tmp_path / "lrsplit" / "seed2").mkdir()  # an unfinished run: no scores, not counted
    text = table.main(tmp_path)
    # mean 0.80, sample standard deviation of (0.75, 0.85) = 0.0707; change 0.80 - 0.70
    assert "| lrsplit | 2 | 0.8000 ± 0.0707 (+0.1000) |" in text
    assert "| lrsplit | 2 | 10 | 0.8000 ± 0.0707 | 0.7000 ± 0.0707 | +0.1000 | +0.1000 |" in text
    assert "| CT_Liver | lrsplit | 0.8000 | 0.8000 ± 0.1414 | +0.0000 |" in text
    assert "| zero-shot LiteMedSAM | - | 10 | 0.7000 | 0.6000 | | |" in text


def test_reader_refuses_a_report_without_its_table(tmp_path):
    path = tmp_path / "ID_details.md"
    path.write_text("# details\n\nno table here\n", encoding="utf-8")
    with pytest.raises(ValueError):
        _table_module().read_details(path)


def _selection_module():
    spec = importlib.util.spec_from_file_location("selection_table", REPO / "scripts" / "selection_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs_csv(path: Path, rows: list[tuple[list[float], dict[str, float]]]) -> None:
    modes = list(rows[0][1])
    lines = [",".join(["File", "Select"] + [f"DSC_{i}" for i in range(len(rows[0][0]))] + [f"DSC_{m}" for m in modes])]
    for j, (fixed, by_mode) in enumerate(rows):
        lines.append(",".join([f"D/T/s{j}.npy", "first"] + [repr(v) for v in fixed] + [repr(by_mode[m]) for m in modes]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_selection_table_reads_the_outputs_reports(tmp_path):
    """scripts/selection_table.py: per set the means of the evaluation's columns, and the default against the
    best fixed output."""
    table = _selection_module()
    modes = {m: 0.0 for m in table.LABEL_FREE_MODES}
    _outputs_csv(tmp_path / "ID" / "internal" / "ID_outputs.csv",
                 [([0.8, 0.6], {"oracle": 0.8, **modes, "first": 0.8}), ([0.6, 0.7], {"oracle": 0.7, **modes, "first": 0.6})])
    _outputs_csv(tmp_path / "HC18" / "external" / "OOD-task_outputs.csv",
                 [([0.5, 0.9], {"oracle": 0.9, **modes, "first": 0.5})])
    text = table.main([str(tmp_path), "--default", "first"])
    # ID: token 0 mean 0.70 is the best fixed (token 1: 0.65); HC18: token 1 (0.9) beats the default's 0.5
    assert "| eval/ID (MedSegDB-real, the trained tasks) | 2 | 0.7500 | 0.7000 | 0.6500 |" in text
    assert "| token 0 | +0.0000 |" in text and "| token 1 | -0.4000 |" in text
    assert "NOT within 0.005" in text and "-0.4000, HC18" in text


def test_against_the_best_label_free_zero_shot(tmp_path):
    """The issue's comparison: the best label-free rule of zero-shot on each set (from the details report's
    "Output choice" ALL row), and each recipe's rules against it."""
    table = _table_module()
    rel = "ID/internal/ID_details.md"

    def write(path: Path, first: float, consensus: float) -> None:
        _details(path, {"ALL": (first, first, 10)})
        modes = ["oracle", "iou", "first (scored)", "stability", "agreement", "iou_stable", "first_stable",
                 "first_confident", "first_consensus"]
        values = [0.95, 0.5, first, 0.5, 0.6, 0.5, first, consensus - 0.01, consensus]
        text = path.read_text(encoding="utf-8")
        text += "\n".join(["## Output choice", "", "Mean DSC ...", "",
                           "| task | N | output 0 | " + " | ".join(modes) + " | scored - best output |",
                           "|---|---:|---:|" + "---:|" * (len(modes) + 1),
                           "| ALL | 10 | 0.7 | " + " | ".join(f"{v:.4f}" for v in values) + " | +0.0000 |", ""])
        path.write_text(text, encoding="utf-8")

    write(tmp_path / "zero-shot" / rel, first=0.70, consensus=0.80)
    write(tmp_path / "ctxdec-only" / "seed0" / "scores" / rel, first=0.75, consensus=0.79)
    choices = table.read_choices(tmp_path / "zero-shot" / rel)
    assert choices["first_consensus"] == 0.8 and choices["oracle"] == 0.95 and choices["first"] == 0.7
    text = table.main(tmp_path)
    assert "| zero-shot LiteMedSAM | best on the set | - | 0.8000 (first_consensus) |" in text
    assert "| ctxdec-only | first_consensus | 1 | 0.7900 (-0.0100) |" in text
    assert "| ctxdec-only | first | 1 | 0.7500 (-0.0500) |" in text
