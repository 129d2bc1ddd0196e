"""The evaluation scripts end to end: published numbers, published file format, bad slices."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluate_external
import evaluate_internal

EXTERNAL = [("OOD", "cross_site"), ("OOD", "cross_task"), ("RealWorld", "cross_site"), ("RealWorld", "cross_task")]


def _tiny_args(tiny_parity_dir: Path, out: Path) -> list[str]:
    return ["--model_type", "vit_tiny", "--checkpoint", str(tiny_parity_dir / "sam_state_dict.pt"),
            "--model_weight", str(tiny_parity_dir / "medsegx_params.pt"), "--device_ids", "--num_workers", "0",
            "--batch_size", "4", "--output_dir", str(out)]


def _shape(text: str) -> str:
    """A report with every number replaced: what must match the published file line for line."""
    return re.sub(r"-?\d+\.\d+(e-?\d+)?|\b\d+\b", "#", text)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_reports(tiny_parity_dir, example_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    args = _tiny_args(tiny_parity_dir, out)
    evaluate_internal.main(evaluate_internal.get_args_parser().parse_args(
        [*args, "--data_path", str(example_db / "eval" / "ID")]))
    for split, shift in EXTERNAL:
        evaluate_external.main(evaluate_external.get_args_parser().parse_args(
            [*args, "--data_path", str(example_db / "eval" / split), "--shift_type", shift]))
    return out


def test_scripts_reproduce_the_published_metrics(tiny_reports, tiny_parity_dir):
    golden = {row["file"]: row for row in _rows(tiny_parity_dir / "golden_metrics.csv")}
    ours = {}
    for path in [tiny_reports / "internal" / "ID.csv", *(tiny_reports / "external").glob("*.csv")]:
        if not path.name.endswith(("_cases.csv", "_outputs.csv")):
            ours.update({row["File"]: row for row in _rows(path)})
    assert len(ours) == len(golden) == 14
    for file, ref in golden.items():
        # golden: <ID | OOD/cross_site ...>/<folders>/[inference/]npy_gts/<name>; ours: <folders>/<name>
        parts = file.split("/")[1 if file.startswith("ID/") else 2:]
        key = "/".join(p for p in parts if p not in ("npy_gts", "inference"))
        row = ours[key]
        assert abs(float(row["DSC"]) - float(ref["DSC"])) <= 1e-4, file
        assert abs(float(row["HD"]) - float(ref["HD95"])) <= 1e-3, file

def test_report_files_have_the_published_format(tiny_reports):
    released = Path(__file__).resolve().parents[2] / "shared" / "reference" / "released_example_results"
    if not released.exists():
        pytest.skip(f"released example results not found at {released}")
    pairs = [("internal-example/ID", "internal/ID")] + [
        (f"external-example/{split}-{shift.split('_')[1]}", f"external/{split}-{shift.split('_')[1]}")
        for split, shift in EXTERNAL]
    for ref, ours in pairs:
        for ext in (".md", ".csv"):
            ref_lines = (released / (ref + ext)).read_text(encoding="utf-8").splitlines()
            our_lines = (tiny_reports / (ours + ext)).read_text(encoding="utf-8").splitlines()
            assert [_shape(x) for x in our_lines] == [_shape(x) for x in ref_lines], ours + ext
    details = (tiny_reports / "internal" / "ID_details.md").read_text(encoding="utf-8")
    assert "iou" in details.lower() and "oracle" in details.lower()
    for fig in ("ID_dsc_boxplot.png", "ID_worst.png"):
        assert (tiny_reports / "internal" / fig).stat().st_size > 1000


def test_empty_label_is_counted_and_reported(tiny_parity_dir, example_db, tmp_path):
    data = tmp_path / "ID"
    shutil.copytree(example_db / "eval" / "ID", data)
    victim = data / "AbdomenCT1K" / "CT_Liver" / "npy_gts" / "casenum_00371_sliceid_50.npy"
    np.save(victim, np.zeros_like(np.load(victim)))
    out = tmp_path / "out"
    evaluate_internal.main(evaluate_internal.get_args_parser().parse_args(
        [*_tiny_args(tiny_parity_dir, out), "--data_path", str(data)]))
    rows = _rows(out / "internal" / "ID.csv")
    assert len(rows) == 9 and all("casenum_00371" not in r["File"] for r in rows)
    details = (out / "internal" / "ID_details.md").read_text(encoding="utf-8")
    assert "casenum_00371_sliceid_50.npy" in details and "empty" in details.lower()


def test_no_model_weight_is_the_baseline_and_says_so(tiny_parity_dir, example_db, tmp_path):
    args = [a for a in _tiny_args(tiny_parity_dir, tmp_path) if a]
    i = args.index("--model_weight")
    del args[i:i + 2]
    evaluate_external.main(evaluate_external.get_args_parser().parse_args(
        [*args, "--data_path", str(example_db / "eval" / "OOD"), "--shift_type", "cross_site",
         "--select", "iou"]))
    details = (tmp_path / "external" / "OOD-site_details.md").read_text(encoding="utf-8")
    assert "No --model_weight" in details and "--select iou" in details


@pytest.mark.slow
def test_vit_b_scripts_on_cpu(example_db, tmp_path):
    """ViT-B with a SAM file in Meta's 1024 layout (random weights: none are shipped here)."""
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam_dir = tmp_path / "SAM"
    sam_dir.mkdir()
    torch.save(sam_model_registry["vit_b"]().state_dict(), sam_dir / "sam_vit_b_01ec64.pth")
    out = tmp_path / "out"
    common = ["--checkpoint", str(sam_dir), "--model_type", "vit_b", "--device_ids", "--num_workers", "0",
              "--batch_size", "8", "--output_dir", str(out), "--metric", "dsc", "hd"]
    evaluate_internal.main(evaluate_internal.get_args_parser().parse_args(
        [*common, "--data_path", str(example_db / "eval" / "ID")]))
    evaluate_external.main(evaluate_external.get_args_parser().parse_args(
        [*common, "--data_path", str(example_db / "eval" / "OOD"), "--shift_type", "cross_task"]))
    assert len(_rows(out / "internal" / "ID.csv")) == 10
    md = (out / "external" / "OOD-task.md").read_text(encoding="utf-8").splitlines()
    assert md[0] == "# external cross_task evaluation" and md[2] == "- CT_ColonCancer"


def test_select_iou_reports_both_means_correctly_labelled(tiny_parity_dir, example_db, tmp_path):
    """--select iou scores the IoU head's choice; the details show it beside the oracle, each labelled."""
    evaluate_internal.main(evaluate_internal.get_args_parser().parse_args(
        [*_tiny_args(tiny_parity_dir, tmp_path), "--data_path", str(example_db / "eval" / "ID"), "--select", "iou"]))
    golden = {row["file"].split("/")[-1]: row for row in _rows(tiny_parity_dir / "golden_metrics_all_masks.csv")}
    rows = _rows(tmp_path / "internal" / "ID.csv")
    oracle = np.mean([max(float(golden[r["File"].split("/")[-1]][f"DSC_{k}"]) for k in range(3)) for r in rows])
    chosen = np.mean([float(r["DSC"]) for r in rows])
    assert chosen < oracle - 1e-3  # the tiny model's IoU head disagrees with the oracle on this set
    details = (tmp_path / "internal" / "ID_details.md").read_text(encoding="utf-8")
    header = next(line for line in details.splitlines() if line.startswith("| task |")).split("|")
    cells = next(line for line in details.splitlines() if line.startswith("| ALL |")).split("|")
    column = {name.strip(): cell.strip() for name, cell in zip(header, cells)}
    assert float(column["DSC (iou)"].split()[0]) == pytest.approx(chosen, abs=1e-4)
    assert float(column["DSC (oracle)"].split()[0]) == pytest.approx(oracle, abs=1e-4)
    assert float(column["oracle - iou"]) == pytest.approx(oracle - chosen, abs=2e-4)
    assert "--select iou" in details
