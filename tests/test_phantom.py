"""The phantom MedSegDB: seeded, in the real layout, binary non-empty masks, a learnable target."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsegx import phantom as ph

SMALL = dict(n_train_per_task=3, n_eval_per_task=2, n_ood_per_site=2, slices_per_case=2)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return ph.make_phantom_db(tmp_path_factory.mktemp("phantom"), seed=0, realworld=True, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def _slice_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("npy_imgs"))


def test_layout(db):
    expected = [
        "train/PhantomAbdomenCT/CT_Liver", "train/PhantomAbdomenCT/CT_LiverCancer",
        "train/PhantomProstateMRI/MRI_Prostate/T2", "train/PhantomProstateMRI/MRI_Prostate/ADC",
        "train/PhantomBreastUS/US_BreastCancer", "train/PhantomDermoscopy/Dermoscopy_Skin",
        "train/PhantomFundus/Fundus_RetinalVessel", "train/PhantomColonoscopy/Endoscope_Polyp",
        "eval/ID/PhantomAbdomenCT/CT_Liver", "eval/ID/PhantomProstateMRI/MRI_Prostate/ADC",
        "eval/OOD/cross_site/CT_Liver/PhantomCTSiteB/finetune",
        "eval/OOD/cross_site/CT_Liver/PhantomCTSiteB/inference",
        "eval/OOD/cross_site/MRI_Prostate/PhantomMRISiteB/T2/inference",
        "eval/OOD/cross_site/Dermoscopy_Skin/PhantomDermSiteB/finetune",
        "eval/OOD/cross_task/CT_StomachCancer/PhantomGastricCT/inference",
        "eval/OOD/cross_task/US_FetalHead/PhantomFetalUS/finetune",
        "eval/RealWorld/cross_site/CT_Liver/PhantomClinicCT/inference",
        "eval/RealWorld/cross_task/CT_StomachCancer/PhantomClinicCT/inference",
    ]
    found = {str(d.relative_to(db)) for d in _slice_dirs(db)}
    assert set(expected) <= found
    assert not any("RealWorld" in d and "finetune" in d for d in found)
    for d in _slice_dirs(db):
        n = len(list((d / "npy_imgs").iterdir()))
        assert n == (SMALL["n_train_per_task"] if d.relative_to(db).parts[0] == "train"
                     else SMALL["n_eval_per_task"] if "ID" in d.parts else SMALL["n_ood_per_site"])
    assert json.loads((db / "phantom.json").read_text(encoding="utf-8"))["seed"] == 0


def test_slices_binary_nonempty_and_paired(db):
    for d in _slice_dirs(db):
        names = sorted(p.name for p in (d / "npy_imgs").iterdir())
        assert names == sorted(p.name for p in (d / "npy_gts").iterdir())
        for name in names:
            img, gt = np.load(d / "npy_imgs" / name), np.load(d / "npy_gts" / name)
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert gt.shape == (256, 256) and gt.dtype == np.uint8
            assert set(np.unique(gt)) == {0, 1}, f"{d / name}: mask not binary and non-empty"


def test_case_names_and_disjoint_cases(db):
    ct = db / "train/PhantomAbdomenCT/CT_Liver/npy_imgs"
    names = [p.name for p in ct.iterdir()]
    assert all(re.fullmatch(r"casenum_\d{3}_sliceid_\d+\.npy", n) for n in names)
    cases = [n.split("_sliceid_")[0] for n in names]
    assert len(set(cases)) < len(cases)  # several slices per case

    def case_ids(folder: Path) -> set[str]:
        return {p.name.split("_sliceid_")[0] for p in (folder / "npy_imgs").iterdir()}

    assert not case_ids(db / "train/PhantomAbdomenCT/CT_Liver") & case_ids(db / "eval/ID/PhantomAbdomenCT/CT_Liver")
    site = db / "eval/OOD/cross_site/CT_Liver/PhantomCTSiteB"
    assert not case_ids(site / "finetune") & case_ids(site / "inference")
    us = [p.name for p in (db / "train/PhantomBreastUS/US_BreastCancer/npy_imgs").iterdir()]
    assert all(re.fullmatch(r"img_\d{4}\.npy", n) for n in us)


def test_sequences_share_anatomy():
    t2_img, t2_gt = ph.make_phantom_slice("MRI_Prostate", case=3, sequence="T2")
    adc_img, adc_gt = ph.make_phantom_slice("MRI_Prostate", case=3, sequence="ADC")
    assert np.array_equal(t2_gt, adc_gt) and not np.array_equal(t2_img, adc_img)
    # two tasks of one dataset: the same image, nested masks (tumour inside liver)
    liver_img, liver_gt = ph.make_phantom_slice("CT_Liver", case=5, t=0.4)
    tumor_img, tumor_gt = ph.make_phantom_slice("CT_LiverCancer", case=5, t=0.4)
    assert np.array_equal(liver_img, tumor_img)
    assert tumor_gt.sum() < liver_gt.sum() and not np.any(tumor_gt & ~liver_gt)


def test_deterministic_by_seed(tmp_path, db):
    again = ph.make_phantom_db(tmp_path / "a", seed=0, realworld=True, **SMALL)
    assert _files(again) == _files(db)
    other = ph.make_phantom_db(tmp_path / "b", seed=1, tasks=["CT_Liver"], **SMALL)
    first_seed0 = np.load(next(iter(sorted((db / "train/PhantomAbdomenCT/CT_Liver/npy_imgs").iterdir()))))
    first_seed1 = np.load(next(iter(sorted((other / "train/PhantomAbdomenCT/CT_Liver/npy_imgs").iterdir()))))
    assert not np.array_equal(first_seed0, first_seed1)
    # a task's slices do not depend on which other tasks are generated
    alone = ph.make_phantom_db(tmp_path / "c", seed=0, tasks=["CT_Liver", "US_FetalHead"], **SMALL)
    full = _files(db)
    assert _files(alone) and all(full[k] == v for k, v in _files(alone).items())


def test_unknown_task_rejected(tmp_path):
    with pytest.raises(ValueError, match="CT_Nothing"):
        ph.make_phantom_db(tmp_path, tasks=["CT_Nothing"])


@pytest.mark.parametrize("folder", sorted({s.folder for s in ph.PHANTOM_TASKS}))
def test_target_is_learnable(folder):
    """The target's mean colour differs clearly from a band just outside it."""
    gaps = []
    for case in range(3):
        img, gt = ph.make_phantom_slice(folder, case=case, t=0.3 + 0.2 * case)
        mask = gt.astype(bool)
        ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
        inside, outside = img[mask].astype(float).mean(0), img[ring].astype(float).mean(0)
        gaps.append(np.abs(inside - outside).max())
    assert min(gaps) > 15, f"{folder}: target hardly differs from its surroundings ({gaps})"


def test_task_folders_in_taxonomy(taxonomy_official):
    tax = json.loads(Path(taxonomy_official).read_text(encoding="utf-8"))
    members = {m for ms in tax["organ_members"].values() for m in ms}
    for spec in ph.PHANTOM_TASKS:
        modality, task = spec.folder.split("_", 1)
        assert modality in tax["modality_aliases"], spec.folder
        if spec.role in ("id", "ood_site", "rw_site"):
            assert task in tax["tasks"], spec.folder
        elif task != "FetalHead":  # FetalHead is outside the tree altogether: a true cross-task
            assert task in members and task not in tax["tasks"], spec.folder


def test_other_sizes_and_speed():
    img, gt = ph.make_phantom_slice("Fundus_RetinalVessel", size=128)
    assert img.shape == (128, 128, 3) and gt.shape == (128, 128) and gt.any()
    start = time.process_time()
    for i in range(100):
        ph.make_phantom_slice(sorted({s.folder for s in ph.PHANTOM_TASKS})[i % 9], case=i)
    assert time.process_time() - start < 5.0  # ~1-5 ms a slice; generous for loaded CI machines


def test_cli(tmp_path):
    args = ph.get_args_parser().parse_args(["--out", str(tmp_path / "db"), "--n", "2", "--n_eval", "1",
                                            "--n_ood", "0", "--tasks", "Dermoscopy_Skin"])
    root = ph.main(args)
    assert sorted(str(d.relative_to(root)) for d in _slice_dirs(root)) == [
        "eval/ID/PhantomDermoscopy/Dermoscopy_Skin", "train/PhantomDermoscopy/Dermoscopy_Skin"]
