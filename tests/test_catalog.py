"""Catalog: layouts, context indices, bad data reported (not raised), the index cache."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import medsegx.data.index as index_module
from medsegx.data.catalog import find_split_roots, open_catalog, problem_counts
from medsegx.data.errors import DataError
from medsegx.data.npy import (
    BAD_IMAGE,
    EMPTY_MASK,
    LAYOUT,
    MISSING_IMAGE,
    MISSING_MASK,
    NOT_NPY,
    SIZE_MISMATCH,
    UNKNOWN_MODALITY,
    UNREADABLE,
)
from medsegx.data.taxonomy import NEUTRAL_ROW, UNKNOWN_TASK


def write_pair(folder: Path, name: str, size=(16, 16), image=None, mask=None) -> None:
    """One image/mask slice under ``folder`` (npy_imgs/npy_gts created as needed)."""
    (folder / "npy_imgs").mkdir(parents=True, exist_ok=True)
    (folder / "npy_gts").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((*size, 3), 100, dtype=np.uint8)
    if mask is None:
        mask = np.zeros(size, dtype=np.uint8)
        mask[4:9, 5:11] = 1
    np.save(folder / "npy_imgs" / name, image)
    np.save(folder / "npy_gts" / name, mask)


def count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("npy_imgs/*.npy"))


def make_writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(dst):
        os.chmod(folder, 0o755)
    return dst


# What the official taxonomy file says for the task folders in the shared test trees, by hand:
# (modality row, body part, subregion, organ, task).
EXPECTED = {
    "CT_Liver": (2, 1, 4, 17, 59),
    "Dermoscopy_Skin": (4, 4, 11, 38, 110),
    "MRI_ProstatePeripheralZone": (7, 1, 5, 27, 82),
    "MRI_ProstateTransitionalZone": (7, 1, 5, 27, 83),
    "MRI_Prostate": (7, 1, 5, 27, 80),
    "CT_ColonCancer": (2, 1, 4, 24, 73),
    "CT_Consolidation": (2, 1, 3, 12, 36),
    "CT_StomachCancer": (2, 1, 4, 23, UNKNOWN_TASK),
    "Endoscope_Polyp": (5, 1, 4, 24, 76),
    "US_BreastCancer": (8, 1, 3, 16, 58),
    "Fundus_RetinalVessel": (6, 3, 10, 37, 99),
    "US_FetalHead": (8, 0, 0, NEUTRAL_ROW, UNKNOWN_TASK),  # synonyms.json: head&neck / head, organ neutral
}


def test_expected_table_matches_official_file(taxonomy_official):
    import json

    official = json.loads(taxonomy_official.read_text(encoding="utf-8"))
    for folder, (modal, *_, task) in EXPECTED.items():
        alias, target = folder.split("_", 1)
        assert official["modalities"][official["modality_aliases"][alias]] == modal
        assert (official["tasks"].index(target) if target in official["tasks"] else UNKNOWN_TASK) == task


@pytest.mark.parametrize("which", ["example_db", "real_db"])
def test_shared_trees_index_every_slice(which, request, tmp_path):
    root = request.getfixturevalue(which)
    catalog = open_catalog(root, cache_dir=tmp_path)
    assert len(catalog) == count_files(root)
    assert not catalog.problems
    for record in catalog:
        assert (record.modal, *record.organ) == EXPECTED[record.task_folder], record.name
        assert record.image_path.is_file() and record.mask_path.is_file()
        assert record.image_path.name == record.mask_path.name
    assert not list(Path(root).rglob(".medsegx*"))  # nothing is ever written into a data tree


def test_example_names_splits_and_groups(example_db, tmp_path):
    catalog = open_catalog(example_db, cache_dir=tmp_path)
    by_name = {r.name: r for r in catalog}
    pz = by_name["MSD_Task05/MRI_ProstatePeripheralZone/ADC/casenum_17_sliceid_8.npy"]
    assert (pz.dataset, pz.sequence, pz.split, pz.subset, pz.case_id, pz.slice_id) == (
        "MSD_Task05", "ADC", "ID", None, "17", "8")
    site = by_name["MRI_Prostate/prostate158/casenum_114_sliceid_14.npy"]
    assert (site.dataset, site.split, site.subset) == ("prostate158", "OOD/cross_site", "inference")
    isic = by_name["ISIC2018/Dermoscopy_Skin/casenum_ISIC_0000017_sliceid_1010.npy"]
    assert isic.case_id == "ISIC_0000017" and isic.slice_id == "1010"

    internal = open_catalog(example_db / "eval" / "ID", cache_dir=tmp_path)
    keys = [key for key, _ in internal.groups()]
    assert keys == [("AbdomenCT1K", "CT_Liver"), ("ISIC2018", "Dermoscopy_Skin"),
                    ("MSD_Task05", "MRI_ProstatePeripheralZone", "ADC"),
                    ("MSD_Task05", "MRI_ProstatePeripheralZone", "T2"),
                    ("MSD_Task05", "MRI_ProstateTransitionalZone", "ADC"),
                    ("MSD_Task05", "MRI_ProstateTransitionalZone", "T2")]
    assert [len(g) for _, g in internal.groups()] == [2, 2, 2, 2, 1, 1]

    ood = open_catalog(example_db / "eval" / "OOD", "cross_task", cache_dir=tmp_path)
    assert [key for key, _ in ood.groups()] == [("CT_ColonCancer", "MSD_Task10")]
    assert {r.split for r in ood} == {"OOD/cross_task"}


def test_root_detection(example_db, real_db):
    split = {r.split for r in find_split_roots(example_db)}
    assert split == {"ID", "OOD/cross_site", "OOD/cross_task", "RealWorld/cross_site", "RealWorld/cross_task"}
    assert [r.split for r in find_split_roots(real_db / "train")] == ["train"]
    assert [r.split for r in find_split_roots(real_db, splits=["train"])] == ["train"]
    assert [r.split for r in find_split_roots(real_db / "eval" / "OOD", "cross_site")] == ["OOD/cross_site"]
    assert [r.split for r in find_split_roots(real_db / "eval" / "OOD" / "cross_task")] == ["OOD/cross_task"]
    assert [r.split for r in find_split_roots(real_db, "cross_task")] == ["OOD/cross_task"]
    inside = find_split_roots(real_db / "train" / "CHAOS")
    assert inside[0].split == "train" and inside[0].within == ("CHAOS",)
    with pytest.raises(ValueError):
        find_split_roots(real_db / "eval" / "OOD", "cross_everything")
    with pytest.raises(FileNotFoundError):
        find_split_roots(real_db / "nowhere")


def test_fetal_head_unknown_task_and_finetune_walk(real_db, tmp_path, caplog):
    catalog = open_catalog(real_db / "eval" / "OOD", "cross_task", cache_dir=tmp_path)
    fetal = catalog.select(task="US_FetalHead")
    assert len(fetal) == 24
    assert {(r.modal, *r.organ) for r in fetal} == {(8, 0, 0, NEUTRAL_ROW, UNKNOWN_TASK)}
    finetune, inference = fetal.select(subset="finetune"), fetal.select(subset="inference")
    assert (len(finetune), len(inference)) == (12, 12)
    assert [key for key, _ in inference.groups()] == [("US_FetalHead", "HC18")]
    assert inference[0].name.startswith("US_FetalHead/HC18/")


def test_sequences_at_any_depth(tmp_path):
    root = tmp_path / "MedSegDB"
    write_pair(root / "train" / "DS" / "MRI_Prostate" / "T2", "casenum_1_sliceid_1.npy")
    write_pair(root / "train" / "DS" / "MRI_Prostate" / "ADC", "casenum_1_sliceid_1.npy")
    write_pair(root / "train" / "DS" / "MRI_Prostate" / "DWI" / "b800", "casenum_1_sliceid_1.npy")
    write_pair(root / "train" / "DS2" / "CT_Liver", "a.npy")
    ext = root / "eval" / "OOD" / "cross_site" / "MRI_Prostate" / "Site"
    write_pair(ext / "T2" / "finetune", "casenum_2_sliceid_3.npy")
    write_pair(ext / "T2" / "inference", "casenum_4_sliceid_3.npy")
    write_pair(ext / "ADC" / "inference", "casenum_4_sliceid_3.npy")
    catalog = open_catalog(root, use_cache=False)
    seqs = {(r.split, r.dataset, r.sequence, r.subset) for r in catalog}
    assert seqs == {("train", "DS", "ADC", None), ("train", "DS", "DWI/b800", None), ("train", "DS", "T2", None),
                    ("train", "DS2", None, None), ("OOD/cross_site", "Site", "T2", "finetune"),
                    ("OOD/cross_site", "Site", "T2", "inference"), ("OOD/cross_site", "Site", "ADC", "inference")}
    names = {r.name for r in catalog}
    assert "DS/MRI_Prostate/DWI/b800/casenum_1_sliceid_1.npy" in names
    assert "MRI_Prostate/Site/T2/casenum_4_sliceid_3.npy" in names
    assert "DS2/CT_Liver/a.npy" in names


def corrupt_copy(real_db: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A copy of MedSegDB-real with one of every kind of bad input; returns it and the expected counts."""
    root = make_writable_copy(real_db, tmp_path / "MedSegDB")
    liver = root / "train" / "CHAOS" / "CT_Liver"
    imgs, gts = liver / "npy_imgs", liver / "npy_gts"
    (gts / "101_1009.npy").unlink()  # image without mask
    (imgs / "101_1042.npy").unlink()  # mask without image
    data = (imgs / "101_1045.npy").read_bytes()
    (imgs / "101_1045.npy").write_bytes(data[: len(data) // 2])  # truncated image
    (gts / "101_1055.npy").write_bytes(b"PK\x03\x04 this is a zip, not npy")  # non-npy content
    np.save(imgs / "102_1022.npy", np.zeros((256, 256, 3), dtype=np.uint16))  # 16-bit image
    np.save(gts / "102_1063.npy", np.zeros((256, 256), dtype=np.uint8))  # empty mask
    np.save(gts / "102_1079.npy", np.ones((128, 128), dtype=np.uint8))  # size mismatch
    (imgs / "notes.txt").write_text("stray file")  # not an npy
    polyp = root / "train" / "Kvasir-SEG" / "Endoscope_Polyp" / "npy_gts"
    for name in sorted(os.listdir(polyp))[:2]:  # masks of 255: binarised, kept, one warning
        np.save(polyp / name, (np.load(polyp / name) * 255).astype(np.uint8))
    write_pair(root / "train" / "Scans" / "PET_Liver", "a.npy")  # unknown modality
    write_pair(root / "train" / "Loose", "b.npy")  # npy_imgs directly under a dataset: layout
    expected = {MISSING_MASK: 1, MISSING_IMAGE: 1, UNREADABLE: 2, BAD_IMAGE: 1, EMPTY_MASK: 1,
                SIZE_MISMATCH: 1, NOT_NPY: 1, UNKNOWN_MODALITY: 1, LAYOUT: 1}
    return root, expected


def test_corrupted_tree_is_reported_not_raised(real_db, tmp_path, caplog):
    root, expected = corrupt_copy(real_db, tmp_path)
    with caplog.at_level(logging.INFO, logger="medsegx.data"):
        catalog = open_catalog(root / "train", cache_dir=tmp_path / "cache")
    assert problem_counts(catalog.problems) == expected
    good = count_files(real_db / "train") - 7  # 13 CHAOS slices minus 7 broken ones
    assert len(catalog) == good
    for problem in catalog.problems:
        assert str(root) in problem.path
        assert Path(problem.path).exists(), problem
    by_kind = {p.kind: p for p in catalog.problems}
    assert by_kind[MISSING_MASK].path.endswith("CT_Liver/npy_imgs/101_1009.npy")
    assert by_kind[BAD_IMAGE].path.endswith("npy_imgs/102_1022.npy") and "uint16" in by_kind[BAD_IMAGE].detail
    assert by_kind[EMPTY_MASK].path.endswith("npy_gts/102_1063.npy")
    assert "truncated" in " ".join(p.detail for p in catalog.problems if p.kind == UNREADABLE)
    assert "PET" in by_kind[UNKNOWN_MODALITY].detail
    log = caplog.text
    assert "skipped bad data" in log and "101_1009.npy" in log and "empty_mask: 1" in log
    binarise = [r for r in caplog.records if "binarised" in r.getMessage()]
    assert len(binarise) == 1 and "Endoscope_Polyp" in binarise[0].getMessage()

    # The problems survive the cache: a second (cached) open reports the same.
    again = open_catalog(root / "train", cache_dir=tmp_path / "cache")
    assert problem_counts(again.problems) == expected and len(again) == good

    with pytest.raises(DataError, match="101_1009.npy"):
        open_catalog(root / "train", cache_dir=tmp_path / "cache", strict=True)


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "train"
    for i in range(3):
        write_pair(root / "DS" / "CT_Liver", f"casenum_{i}_sliceid_0.npy")
        write_pair(root / "DS" / "CT_Spleen", f"casenum_{i}_sliceid_0.npy")
    scanned: list[str] = []
    real_scan = index_module._scan_leaf

    def counting_scan(split_root, rel, sig, pool):
        scanned.append(rel)
        return real_scan(split_root, rel, sig, pool)

    monkeypatch.setattr(index_module, "_scan_leaf", counting_scan)
    first = open_catalog(root)
    assert len(first) == 6 and sorted(scanned) == ["DS/CT_Liver", "DS/CT_Spleen"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "npy_" not in str(p.parent)) == []

    scanned.clear()
    assert [r.name for r in open_catalog(root)] == [r.name for r in first]
    assert scanned == []  # nothing listed again

    write_pair(root / "DS" / "CT_Liver", "casenum_9_sliceid_0.npy")
    scanned.clear()
    second = open_catalog(root)
    assert scanned == ["DS/CT_Liver"] and len(second) == 7

    for sub in ("npy_imgs", "npy_gts"):
        (root / "DS" / "CT_Spleen" / sub / "casenum_0_sliceid_0.npy").unlink()
    write_pair(root / "DS2" / "CT_Kidney", "x.npy")  # a new folder
    scanned.clear()
    third = open_catalog(root)
    assert sorted(scanned) == ["DS/CT_Spleen", "DS2/CT_Kidney"] and len(third) == 7
    assert "DS/CT_Spleen/casenum_0_sliceid_0.npy" not in {r.name for r in third}

    shutil.rmtree(root / "DS2")
    scanned.clear()
    assert len(open_catalog(root)) == 6 and scanned == []

    scanned.clear()
    open_catalog(root, refresh=True)
    assert len(scanned) == 2

    monkeypatch.setattr(index_module, "INDEX_FORMAT", index_module.INDEX_FORMAT + 1)
    scanned.clear()
    open_catalog(root)
    assert len(scanned) == 2  # an old cache format is rebuilt


def test_partial_walk_keeps_the_rest_of_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "train"
    write_pair(root / "A" / "CT_Liver", "a.npy")
    write_pair(root / "B" / "CT_Liver", "b.npy")
    open_catalog(root)
    write_pair(root / "A" / "CT_Liver", "a2.npy")
    assert len(open_catalog(root / "A")) == 2  # a dataset folder inside train/
    scanned = []
    real_scan = index_module._scan_leaf
    monkeypatch.setattr(index_module, "_scan_leaf",
                        lambda *a: scanned.append(a[1]) or real_scan(*a))
    assert len(open_catalog(root)) == 3 and scanned == []


def test_index_lives_in_the_user_cache_never_in_the_data(tmp_path, monkeypatch):
    root = tmp_path / "data" / "train"
    write_pair(root / "DS" / "CT_Liver", "a.npy")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("MEDSEGX_CACHE_DIR", str(user_cache))
    open_catalog(root)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the data tree is untouched
    assert len(list(user_cache.glob("*.npz"))) == 1
    scanned = []
    real_scan = index_module._scan_leaf
    monkeypatch.setattr(index_module, "_scan_leaf", lambda *a: scanned.append(a[1]) or real_scan(*a))
    assert len(open_catalog(root)) == 1 and scanned == []


def test_cache_never_answers_for_a_changed_tree_at_the_same_path(tmp_path, monkeypatch):
    """A reused temporary path: same folders and file names, other contents (the pytest tmp reuse bug)."""
    monkeypatch.setenv("MEDSEGX_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "reused" / "train"
    write_pair(root / "DS" / "CT_Liver", "a.npy")
    write_pair(root / "DS" / "CT_Liver", "b.npy")
    assert len(open_catalog(root)) == 2
    shutil.rmtree(tmp_path / "reused")
    write_pair(root / "DS" / "CT_Liver", "a.npy")
    write_pair(root / "DS" / "CT_Liver", "b.npy", mask=np.zeros((16, 16), dtype=np.uint8))  # now empty
    catalog = open_catalog(root)
    assert [r.name for r in catalog] == ["DS/CT_Liver/a.npy"]
    assert problem_counts(catalog.problems) == {EMPTY_MASK: 1}
    # a file rewritten in place (its folder's time unchanged) is checked again too
    mask_dir = root / "DS" / "CT_Liver" / "npy_gts"
    folder_time = os.stat(mask_dir).st_mtime_ns
    np.save(mask_dir / "a.npy", np.zeros((16, 16), dtype=np.uint8))
    os.utime(mask_dir, ns=(folder_time, folder_time))
    assert len(open_catalog(root)) == 0


def test_broken_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "train"
    write_pair(root / "DS" / "CT_Liver", "a.npy")
    open_catalog(root)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(b"garbage")
    assert len(open_catalog(root)) == 1


def test_select_subset_split_views(real_db, tmp_path):
    catalog = open_catalog(real_db, cache_dir=tmp_path)
    train = catalog.select(split="train")
    assert {r.split for r in train} == {"train"} and len(train) == count_files(real_db / "train")
    assert len(catalog.select(split="OOD")) == count_files(real_db / "eval" / "OOD")
    assert len(catalog[:5]) == 5 and catalog[:5][0] == catalog[0]
    assert catalog.take([3, 1])[0] == catalog[3]
