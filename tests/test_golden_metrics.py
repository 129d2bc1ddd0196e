"""The published evaluation's metrics on the tiny-parity fixture: DSC / HD95 of every output
and the oracle (best-DSC, ties to the first) selection."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medsegx.metrics import dice, hd95, score_multimask, select_masks


def _load_fixture_module(folder: Path):
    spec = importlib.util.spec_from_file_location("tiny_parity_load_fixture", folder / "load_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture(tiny_parity_dir):
    lf = _load_fixture_module(tiny_parity_dir)
    masks = lf.load_outputs()["mask_binary"].numpy()  # bool 14 x 3 x 256 x 256
    _, label, _ = lf.load_inputs()                    # int64 14 x 1 x 256 x 256
    with open(tiny_parity_dir / "golden_metrics_all_masks.csv", newline="") as f:
        all_masks = list(csv.DictReader(f))
    with open(tiny_parity_dir / "golden_metrics.csv", newline="") as f:
        best = list(csv.DictReader(f))
    return masks, label, all_masks, best


def test_every_output_reproduces_golden_dsc_and_hd95(fixture):
    masks, label, all_masks, _ = fixture
    assert masks.shape == (14, 3, 256, 256) and len(all_masks) == 14
    for k in range(3):
        gold_dsc = np.array([float(r[f"DSC_{k}"]) for r in all_masks])
        gold_hd = np.array([float(r[f"HD95_{k}"]) for r in all_masks])
        np.testing.assert_allclose(dice(masks[:, k], label), gold_dsc, rtol=0, atol=1e-4)
        np.testing.assert_allclose(hd95(masks[:, k], label, empty="published"), gold_hd, rtol=0, atol=1e-3)


def test_oracle_selection_reproduces_golden(fixture):
    masks, label, _, best = fixture
    gold_idx = [int(r["best_mask_idx"]) for r in best]
    assert select_masks(masks, label, mode="oracle").tolist() == gold_idx
    scores = score_multimask(masks, label)
    assert scores["idx"].tolist() == gold_idx
    np.testing.assert_allclose(scores["dsc"], [float(r["DSC"]) for r in best], rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores["hd95"], [float(r["HD95"]) for r in best], rtol=0, atol=1e-3)
