"""medsegx.reports: the published files byte for byte, and the extra reports."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from medsegx.data.layout import external_stem
from medsegx.errors import UserError
from medsegx.fileio import atomic_write_set
from medsegx.reports import (
    SliceResult,
    case_dsc,
    external_title,
    format_details_md,
    format_slices_csv,
    format_summary_md,
    internal_title,
    plot_gallery,
    worst_results,
    write_report,
)

EXAMPLES = [
    ("internal-example", "ID", internal_title()),
    ("external-example", external_stem("OOD", "cross_site"), external_title("cross_site")),
    ("external-example", external_stem("OOD", "cross_task"), external_title("cross_task")),
    ("external-example", external_stem("RealWorld", "cross_site"), external_title("cross_site")),
    ("external-example", external_stem("RealWorld", "cross_task"), external_title("cross_task")),
]


def read_published_csv(path) -> list[SliceResult]:
    """Results from a published ``File,DSC,HD`` CSV (group = folders of the File key)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != {"File", "DSC", "HD"}:
        raise ValueError(f"{path}: expected columns File,DSC,HD, got {list(rows[0])}")
    return [SliceResult(r["File"], dsc=float(r["DSC"] or "nan"), hd=float(r["HD"] or "nan")) for r in rows]


def write_published(results, out_dir: Path, stem: str, title: str) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.csv`` as the reports write them (float32 values, as the published code)."""
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    atomic_write_set({md: format_summary_md(results, title, True), cs: format_slices_csv(results, True)})
    return md, cs


@pytest.mark.parametrize("folder,stem,title", EXAMPLES)
def test_released_examples_reproduced_line_for_line(tmp_path, folder, stem, title):
    ref = shared_path("reference", "released_example_results", folder)
    results = read_published_csv(ref / f"{stem}.csv")
    md, cs = write_published(results, tmp_path, stem, title)
    assert md.read_text(encoding="utf-8").splitlines() == (ref / f"{stem}.md").read_text(encoding="utf-8").splitlines()
    assert md.read_bytes() == (ref / f"{stem}.md").read_bytes()
    assert cs.read_bytes() == (ref / f"{stem}.csv").read_bytes()


def test_stems_and_titles():
    assert external_stem("OOD", "cross_site") == "OOD-site"
    assert external_stem("RealWorld", "cross_task") == "RealWorld-task"
    assert external_title("cross_task") == "external cross_task evaluation"


def _r(name, dsc, hd, **kw):
    return SliceResult(name=name, dsc=dsc, hd=hd, **kw)


def test_all_mean_is_over_slices_and_groups_nest_in_order():
    results = [
        _r("D2/T_b/casenum_1_sliceid_1.npy", 1.0, 2.0),
        _r("D1/T_a/S2/casenum_1_sliceid_1.npy", 0.5, 4.0),
        _r("D1/T_a/S2/casenum_1_sliceid_2.npy", 0.25, 8.0),
        _r("D1/T_a/S1/casenum_2_sliceid_1.npy", 0.0, 1.0),
    ]
    md = format_summary_md(results, "internal evaluation")
    assert md == (
        "# internal evaluation\n\n"
        "- D2\n"
        "  - T_b: DSC (1.0000), HD (2.0000)\n"
        "- D1\n"
        "  - T_a\n"
        "    - S2: DSC (0.3750), HD (6.0000)\n"
        "    - S1: DSC (0.0000), HD (1.0000)\n"
        "- ALL\n"
        "  - Mean: DSC (0.4375), HD (3.7500)\n"  # slice mean; the group mean would be 0.4583
    )


def test_csv_float32_nan_and_skipped():
    results = [
        _r("A/T/casenum_1_sliceid_1.npy", 0.1, 2.5),
        _r("A/T/casenum_1_sliceid_2.npy", 0.9, math.nan),
        _r("A/T/casenum_1_sliceid_3.npy", math.nan, math.nan, skipped="empty label"),
    ]
    assert format_slices_csv(results) == (
        "File,DSC,HD\n"
        "A/T/casenum_1_sliceid_1.npy,0.10000000149011612,2.5\n"
        "A/T/casenum_1_sliceid_2.npy,0.8999999761581421,\n"
    )
    assert format_slices_csv(results, float32=False).splitlines()[1] == "A/T/casenum_1_sliceid_1.npy,0.1,2.5"
    md = format_summary_md(results, "t")
    assert "- T: DSC (0.5000), HD (2.5000)" in md  # NaN ignored, skipped slice left out
    details = format_details_md(results, "t")
    assert "empty label: 1" in details and "HD NaN: 1" in details


def test_group_with_slices_and_subgroups_is_rejected():
    results = [_r("A/T/x.npy", 1.0, 1.0), _r("A/T/S/y.npy", 1.0, 1.0)]
    with pytest.raises(ValueError, match="slices and subgroups"):
        format_summary_md(results, "t")
    with pytest.raises(ValueError, match="no scored slices"):
        format_summary_md([_r("A/x.npy", 1.0, 1.0, skipped="why")], "t")


def test_case_dsc_volumetric_and_slice_mean():
    results = [
        _r("D/T/casenum_7_sliceid_1.npy", 2 * 10 / (20 + 10), 1.0, intersection=10, pred_size=20, gt_size=10),
        _r("D/T/casenum_7_sliceid_2.npy", 2 * 90 / (90 + 100), 1.0, intersection=90, pred_size=90, gt_size=100),
        _r("D/T/casenum_8_sliceid_1.npy", 0.5, 1.0),
        _r("D/T/casenum_8_sliceid_2.npy", 0.7, 1.0),
    ]
    cases = {c["case"]: c for c in case_dsc(results)}
    assert cases["7"]["dsc_volume"] == pytest.approx(2 * 100 / (110 + 110))
    assert cases["7"]["dsc"] == cases["7"]["dsc_volume"]
    assert math.isnan(cases["8"]["dsc_volume"]) and cases["8"]["dsc"] == pytest.approx(0.6)
    assert cases["7"]["n_slices"] == 2


def test_details_show_selection_gap_and_mm(tmp_path):
    results = [
        _r("T1/DS/casenum_1_sliceid_1.npy", 0.9, 2.0, dsc_iou=0.8, dsc_first=0.7, hd95_mm=1.0, nsd=0.95),
        _r("T1/DS/casenum_1_sliceid_2.npy", 0.7, 4.0, dsc_iou=0.6, dsc_first=0.5, hd95_mm=2.0, nsd=0.85),
        _r("T2/DS/casenum_2_sliceid_1.npy", 0.5, 6.0, dsc_iou=0.5, dsc_first=0.4),
    ]
    text = format_details_md(results, "external cross_site evaluation", layout="external")
    t1 = next(line for line in text.splitlines() if line.startswith("| T1 |"))
    # the oracle choice is scored (the default), so its DSC stands in both the chosen and the oracle column
    assert "| 2 | 0.8000 ± 0.1414 | 0.8000 ± 0.1414 | 0.7000 ± 0.1414 | 0.6000 ± 0.1414 | +0.1000 |" in t1
    assert "1.50 ± 0.71" in t1 and "0.9000 ± 0.0707" in t1
    assert worst_results(results, 1)[0].name.startswith("T2/")
    with pytest.raises(ValueError):
        format_details_md(results, "t", layout="sideways")


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(0)
    results = [_r(f"D/T{i % 3}/casenum_{i}_sliceid_0.npy", float(rng.random()), float(rng.random() * 9))
               for i in range(12)]
    image = rng.integers(0, 255, (3, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32), bool)
    label[8:20, 8:20] = True
    gallery = [{"title": r.name, "image": image, "label": label, "pred": np.roll(label, 3, 1)}
               for r in worst_results(results, 2)]
    paths = write_report(results, tmp_path / "internal", "ID", internal_title(), gallery=gallery)
    for key in ("md", "csv", "details", "cases", "boxplot", "gallery"):
        assert paths[key].is_file(), key
    for key in ("boxplot", "gallery"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_published_csv(paths["csv"])[0].group == ("D", "T0")
    # the published files stay the published files: nothing else in them
    assert paths["md"].read_text(encoding="utf-8") == format_summary_md(results, internal_title())
    assert plot_gallery(gallery[:1], tmp_path / "one.png").is_file()


def test_details_label_the_selection_mode():
    """--select iou: the published numbers are the iou choice's, and the details show both means, labelled."""
    rows = [SliceResult(f"D/T/casenum_{i}_sliceid_0.npy", dsc=d_iou, hd=1.0, select="iou", dsc_oracle=d_or,
                        dsc_iou=d_iou, dsc_first=d_first)
            for i, (d_or, d_iou, d_first) in enumerate([(0.9, 0.5, 0.5), (0.8, 0.8, 0.2)])]
    details = format_details_md(rows, "internal evaluation")
    header = next(line for line in details.splitlines() if line.startswith("| task |"))
    assert "DSC (scored: iou) | DSC (oracle) | DSC (iou) | DSC (first) | oracle - iou" in header
    all_row = next(line for line in details.splitlines() if line.startswith("| ALL |")).split("|")
    assert all_row[3].strip().startswith("0.6500") and all_row[4].strip().startswith("0.8500")
    assert all_row[7].strip() == "+0.2000"
    assert "--select iou" in details
    assert "DSC (0.6500)" in format_summary_md(rows, "internal evaluation")


def test_details_and_outputs_report_every_output_and_rule(tmp_path):
    """With every output's DSC, the details gain the output-choice table and <stem>_outputs.csv is written."""
    rows = [SliceResult(f"D/T/casenum_{i}_sliceid_0.npy", dsc=d[m], hd=1.0, select="first_consensus",
                        dsc_outputs=outs, dsc_modes=d, output_scores={"iou": [0.9, 0.2], "agreement": [0.5, 0.5]})
            for i, (outs, d, m) in enumerate([([0.9, 0.5], {"oracle": 0.9, "first": 0.9, "first_consensus": 0.9},
                                               "first_consensus"),
                                              ([0.4, 0.8], {"oracle": 0.8, "first": 0.4, "first_consensus": 0.8},
                                               "first_consensus")])]
    details = format_details_md(rows, "internal evaluation")
    header = next(line for line in details.splitlines() if line.startswith("| task | N | output 0"))
    assert "| oracle | first | first_consensus (scored) | scored - best output |" in header
    # outputs 0.65 / 0.65 on average, the oracle 0.85, the default's choice 0.85: +0.20 over the best output
    assert "| ALL | 2 | 0.6500 | 0.6500 | 0.8500 | 0.6500 | 0.8500 | +0.2000 |" in details
    paths = write_report(rows, tmp_path, "ID", internal_title())
    lines = paths["outputs"].read_text(encoding="utf-8").splitlines()
    assert lines[0] == "File,Select,DSC_0,DSC_1,iou_0,iou_1,agreement_0,agreement_1,DSC_oracle,DSC_first,DSC_first_consensus"
    assert lines[2] == "D/T/casenum_1_sliceid_0.npy,first_consensus,0.4,0.8,0.9,0.2,0.5,0.5,0.8,0.4,0.8"


def test_read_published_csv_rejects_other_columns(tmp_path):
    bad = Path(tmp_path / "bad.csv")
    bad.write_text("File,Dice\nA/x.npy,1\n")
    with pytest.raises(ValueError, match="File,DSC,HD"):
        read_published_csv(bad)


def test_compare_reports_per_task_and_says_when_worse(tmp_path):
    from medsegx.reports import compare_reports

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("File,DSC,HD\nD/CT_Liver/x.npy,0.8,1\nD/CT_Liver/y.npy,0.6,1\nE/US_Breast/z.npy,0.5,1\n")
    b.write_text("File,DSC,HD\nD/CT_Liver/x.npy,0.9,1\nD/CT_Liver/y.npy,0.7,1\nE/US_Breast/z.npy,0.2,1\n")
    table = compare_reports(a, b, ("zero-shot", "trained"), external=False)
    assert "| CT_Liver | 2 | 0.7000 | 0.8000 | +0.1000 |" in table
    assert "| US_Breast | 1 | 0.5000 | 0.2000 | -0.3000 |" in table
    assert "| ALL (mean over slices) | 3 | 0.6333 | 0.6000 | -0.0333 |" in table
    assert "**trained is worse than zero-shot overall (-0.0333 mean DSC).**" in table
    assert "worse" not in compare_reports(b, b, ("x", "y"), external=False)
    (tmp_path / "c.csv").write_text("File,DSC,HD\nother/T/q.npy,1,1\n")
    with pytest.raises(UserError, match="share no slice"):
        compare_reports(a, tmp_path / "c.csv", ("x", "y"), external=False)
