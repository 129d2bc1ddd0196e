"""MedSegDataset: sample format, parity with the published dataset, resizing, jitter, subsets."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsegx.data.catalog import open_catalog
from medsegx.data.dataset import MedSegDataset, load_image, load_mask, tight_box
from medsegx.data.errors import DataError
from medsegx.data.npy import BAD_IMAGE


def write_pair(folder: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (folder / "npy_imgs").mkdir(parents=True, exist_ok=True)
    (folder / "npy_gts").mkdir(parents=True, exist_ok=True)
    np.save(folder / "npy_imgs" / name, image)
    np.save(folder / "npy_gts" / name, mask)


def box_mask(size, box) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1 + 1, x0:x1 + 1] = 1
    return mask


def test_matches_published_dataset_on_the_fixture(example_db, tiny_parity_dir, tmp_path):
    """Images, labels, boxes and contexts of the 14 example slices equal the published batch."""
    sys.path.insert(0, str(tiny_parity_dir))
    try:
        from load_fixture import load_inputs
    finally:
        sys.path.remove(str(tiny_parity_dir))
    data, label, _ = load_inputs()
    catalog = open_catalog(example_db, cache_dir=tmp_path)
    dataset = MedSegDataset(catalog)
    position = {r.mask_path.as_posix().split("/eval/", 1)[1]: i for i, r in enumerate(catalog)}
    for k, name in enumerate(data["name"]):
        sample = dataset[position[name]]
        assert torch.equal(sample["image"], data["img"][k]), name
        assert torch.equal(sample["label"], label[k]), name
        assert torch.equal(sample["box"], data["box"][k]), name
        assert int(sample["modal"]) == int(data["modal"][k])
        assert sample["organ"].tolist() == [int(level[k]) for level in data["organ"]]


def test_sample_format_and_collate(example_db, tmp_path):
    catalog = open_catalog(example_db / "eval" / "ID", cache_dir=tmp_path)
    sample = MedSegDataset(catalog)[0]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 256, 256)
    assert 0 <= sample["image"].min() and sample["image"].max() <= 255
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == (1, 256, 256)
    assert set(sample["label"].unique().tolist()) == {0, 1}
    assert sample["box"].dtype == torch.float32 and sample["box"].shape == (4,)
    assert sample["modal"].dtype == torch.int64 and sample["modal"].shape == ()
    assert sample["organ"].dtype == torch.int64 and sample["organ"].shape == (4,)
    assert sample["name"] == "AbdomenCT1K/CT_Liver/casenum_00371_sliceid_50.npy" and sample["index"] == 0
    batch = next(iter(DataLoader(MedSegDataset(catalog), batch_size=4)))
    assert batch["image"].shape == (4, 3, 256, 256) and batch["organ"].shape == (4, 4)
    assert batch["modal"].shape == (4,) and len(batch["name"]) == 4 and batch["index"].tolist() == [0, 1, 2, 3]


def test_external_names(example_db, tmp_path):
    catalog = open_catalog(example_db / "eval" / "OOD", "cross_site", cache_dir=tmp_path)
    assert MedSegDataset(catalog)[0]["name"] == "MRI_Prostate/prostate158/casenum_114_sliceid_14.npy"


def test_tight_box():
    mask = box_mask((20, 30), (3, 5, 12, 9))
    assert tight_box(mask).tolist() == [3, 5, 12, 9]
    with pytest.raises(ValueError):
        tight_box(np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(256, 256), (256, 256, 1)])
def test_grayscale_images_are_replicated(tmp_path, shape):
    gray = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    write_pair(folder, "a.npy", gray, box_mask((256, 256), (10, 10, 40, 50)))
    catalog = open_catalog(tmp_path / "ID", use_cache=False)
    assert len(catalog) == 1 and not catalog.problems
    image = MedSegDataset(catalog)[0]["image"]
    expected = torch.from_numpy(gray.reshape(256, 256)).float()
    for channel in range(3):
        assert torch.equal(image[channel], expected)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_16bit_and_float_images_are_refused(tmp_path, dtype):
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    write_pair(folder, "a.npy", np.zeros((32, 32, 3), dtype=dtype), box_mask((32, 32), (1, 1, 5, 5)))
    catalog = open_catalog(tmp_path / "ID", use_cache=False)
    assert len(catalog) == 0 and [p.kind for p in catalog.problems] == [BAD_IMAGE]
    with pytest.raises(DataError, match="uint8"):
        load_image(folder / "npy_imgs" / "a.npy")


def test_multilabel_masks_are_binarised_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    write_pair(folder, "a.npy", image, box_mask((32, 32), (2, 2, 6, 6)) * 255)
    labels = box_mask((32, 32), (2, 2, 6, 6))
    labels[10:12, 10:12] = 3
    write_pair(folder, "b.npy", image, labels)
    with caplog.at_level(logging.WARNING, logger="medsegx.data.catalog"):
        catalog = open_catalog(tmp_path / "ID", use_cache=False)
    assert len(catalog) == 2 and not catalog.problems
    warnings = [r for r in caplog.records if "binarised" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2 masks" in warnings[0].getMessage()
    dataset = MedSegDataset(catalog)
    assert set(dataset[0]["label"].unique().tolist()) == {0, 1}
    assert dataset[1]["box"].tolist() == [16, 16, 95, 95]  # pixels 2..11 of 32 cover 16..95 of 256
    assert load_mask(folder / "npy_gts" / "a.npy").max() == 1


def test_resize_other_sizes(tmp_path):
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    height, width = 384, 512
    image = np.random.default_rng(1).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    write_pair(folder, "a.npy", image, box_mask((height, width), (100, 60, 299, 179)))
    sample = MedSegDataset(open_catalog(tmp_path / "ID", use_cache=False))[0]
    assert sample["image"].shape == (3, 256, 256) and sample["label"].shape == (1, 256, 256)
    assert set(sample["label"].unique().tolist()) == {0, 1}
    ys, xs = torch.nonzero(sample["label"][0], as_tuple=True)
    assert abs(int(xs.min()) - 50) <= 1 and abs(int(ys.max()) - 119) <= 1
    assert sample["box"].tolist() == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    # Antialiased: the mean intensity is preserved closely, values stay in range.
    assert abs(float(sample["image"].mean()) - float(image.mean())) < 1.0
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 255


def test_jitter_only_in_training_and_per_instance(real_db, tmp_path):
    catalog = open_catalog(real_db / "train", cache_dir=tmp_path).select(dataset="CHAOS")
    train_part, val_part = catalog.train_val_split(0.2, seed=0)
    train_set = MedSegDataset(train_part, train=True)
    val_set = MedSegDataset(val_part, train=False)  # made after the training set: must not switch it off
    assert train_set.train and not val_set.train
    torch.manual_seed(0)
    tight = tight_box(load_mask(train_part[0].mask_path))
    boxes = torch.stack([train_set[0]["box"] for _ in range(30)])
    assert len({tuple(b.tolist()) for b in boxes}) > 1  # jittered
    assert (boxes[:, :2] <= torch.tensor(tight[:2], dtype=torch.float32)).all()
    assert (boxes[:, 2:] >= torch.tensor(tight[2:], dtype=torch.float32)).all()
    assert (boxes[:, :2] >= torch.tensor(tight[:2], dtype=torch.float32) - 20).all()
    assert (boxes[:, 2:] <= torch.tensor(tight[2:], dtype=torch.float32) + 20).all()
    assert boxes.min() >= 0 and boxes.max() <= 255
    val_boxes = {tuple(val_set[0]["box"].tolist()) for _ in range(5)}
    assert val_boxes == {tuple(float(v) for v in tight_box(load_mask(val_part[0].mask_path)))}
    torch.manual_seed(1)
    again = [train_set[0]["box"] for _ in range(5)]
    assert len({tuple(b.tolist()) for b in again}) > 1  # still training after the val set was used


def test_box_jitter_flag(real_db, tmp_path):
    """--box_jitter defaults to the backbone's own training jitter (LiteMedSAM 5 px, the paper's SAM 20 px,
    the dataset's default) and bounds the training boxes."""
    from medsegx.args import train_parser
    from medsegx.data.grid import PAPER_BOX_JITTER as BOX_JITTER
    for finetune in (False, True):
        argv = ["--shift_type", "cross_site"] if finetune else []
        parse = train_parser("x", finetune=finetune).parse_args
        assert parse(argv).box_jitter == BOX_JITTER == 20  # default model_type: vit_b
        assert parse([*argv, "--model_type", "lite"]).box_jitter == 5
        assert parse([*argv, "--model_type", "lite", "--box_jitter", "12"]).box_jitter == 12
    catalog = open_catalog(real_db / "train", cache_dir=tmp_path).select(dataset="CHAOS")
    train_set = MedSegDataset(catalog, train=True, jitter=3, seed=0)
    tight = torch.tensor(tight_box(load_mask(catalog[0].mask_path)), dtype=torch.float32)
    boxes = []
    for epoch in range(12):
        train_set.set_epoch(epoch)
        boxes.append(train_set[0]["box"])
    grow = (torch.stack(boxes) - tight) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert grow.min() >= 0 and grow.max() == 3  # 0..3 px per side, the bound reached over 12 epochs


def test_jitter_is_clipped_to_the_image(tmp_path):
    folder = tmp_path / "train" / "DS" / "CT_Liver"
    write_pair(folder, "a.npy", np.zeros((256, 256, 3), dtype=np.uint8), box_mask((256, 256), (0, 2, 254, 255)))
    dataset = MedSegDataset(open_catalog(tmp_path / "train", use_cache=False), train=True)
    torch.manual_seed(0)
    for _ in range(20):
        box = dataset[0]["box"]
        assert box[0] == 0 and box[3] == 255 and 0 <= box[1] <= 2 and 254 <= box[2] <= 255


def _cases(catalog):
    return set(catalog.case_keys())


def make_case_tree(root: Path, n_cases: int = 40, slices: int = 3) -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    mask = box_mask((8, 8), (1, 1, 3, 3))
    for case in range(n_cases):
        for s in range(slices):
            for dataset, task in (("SiteA", "MRI_Prostate"), ("SiteB", "CT_Liver")):
                write_pair(root / dataset / task, f"casenum_{case:03d}_sliceid_{s}.npy", image, mask)


def test_subsets_nest_and_keep_cases_whole(tmp_path):
    make_case_tree(tmp_path / "train")
    catalog = open_catalog(tmp_path / "train", use_cache=False)
    assert len(catalog) == 240
    ratios = [0.15, 0.25, 0.5, 1.0]
    subsets = [catalog.subset(r, seed=7) for r in ratios]
    for ratio, sub in zip(ratios, subsets, strict=True):
        per_dataset = {}
        for dataset, case in _cases(sub):
            per_dataset.setdefault(dataset, set()).add(case)
        assert {d: len(c) for d, c in per_dataset.items()} == {"SiteA": int(np.ceil(40 * ratio - 1e-9)),
                                                               "SiteB": int(np.ceil(40 * ratio - 1e-9))}
        assert len(sub) == 3 * 2 * int(np.ceil(40 * ratio - 1e-9))  # every slice of a chosen case
    for small, large in zip(subsets, subsets[1:]):
        assert _cases(small) <= _cases(large)
        assert {r.name for r in small} <= {r.name for r in large}
    assert _cases(catalog.subset(0.25, seed=7)) == _cases(subsets[1])  # deterministic
    assert _cases(catalog.subset(0.25, seed=8)) != _cases(subsets[1])
    by_count = catalog.subset(n_cases=5, seed=7)
    assert len(_cases(by_count)) == 10 and _cases(by_count) <= _cases(subsets[0])
    # One site's subset does not depend on what else was indexed.
    site_a = open_catalog(tmp_path / "train" / "SiteA", use_cache=False)
    assert _cases(site_a.subset(0.25, seed=7)) == {k for k in _cases(subsets[1]) if k[0] == "SiteA"}
    with pytest.raises(ValueError):
        catalog.subset(0.0)
    with pytest.raises(ValueError):
        catalog.subset(0.5, n_cases=3)


def test_train_val_split_by_case(tmp_path):
    make_case_tree(tmp_path / "train")
    catalog = open_catalog(tmp_path / "train", use_cache=False)
    train, val = catalog.train_val_split(0.2, seed=3)
    assert len(train) + len(val) == len(catalog)
    assert not _cases(train) & _cases(val)
    assert len(_cases(val)) == 16 and len(_cases(train)) == 64
    again_train, _ = catalog.train_val_split(0.2, seed=3)
    assert [r.name for r in again_train] == [r.name for r in train]
    # Data-ratio subsets of the training part still nest.
    assert _cases(train.subset(0.15, seed=3)) <= _cases(train.subset(0.5, seed=3))
    one_case = catalog.select(dataset="SiteA").take([0])
    assert len(one_case.train_val_split(0.2)[1]) == 0


def test_truncated_after_indexing_is_a_clear_error(tmp_path):
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    write_pair(folder, "a.npy", np.zeros((32, 32, 3), dtype=np.uint8), box_mask((32, 32), (1, 1, 5, 5)))
    dataset = MedSegDataset(open_catalog(tmp_path / "ID", use_cache=False))
    path = folder / "npy_imgs" / "a.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="a.npy"):
        dataset[0]


def test_unreadable_training_slice_is_replaced_unless_strict(tmp_path, caplog):
    folder = tmp_path / "train" / "DS" / "CT_Liver"
    for name in ("a.npy", "b.npy"):
        write_pair(folder, name, np.zeros((32, 32, 3), dtype=np.uint8), box_mask((32, 32), (1, 1, 5, 5)))
    catalog = open_catalog(tmp_path / "train", use_cache=False)
    (folder / "npy_gts" / "a.npy").unlink()  # gone after indexing
    lenient = MedSegDataset(catalog, train=True)
    with caplog.at_level(logging.WARNING, logger="medsegx.data.dataset"):
        sample = lenient[0]
    assert sample["name"].endswith("b.npy") and sample["index"] == 1 and lenient.skipped == 1
    assert "a.npy" in caplog.text
    with pytest.raises(DataError, match="a.npy"):
        MedSegDataset(catalog, train=True, strict=True)[0]
    with pytest.raises(DataError, match="a.npy"):
        MedSegDataset(catalog, train=False)[0]  # evaluation never substitutes


def test_seeded_jitter_depends_on_seed_epoch_index_only(real_db, tmp_path):
    catalog = open_catalog(real_db / "train", cache_dir=tmp_path).select(dataset="BUSI")

    def boxes(seed, epoch=0, order=range(6)):
        dataset = MedSegDataset(catalog, train=True, seed=seed)
        dataset.set_epoch(epoch)
        return {i: tuple(dataset[i]["box"].tolist()) for i in order}

    torch.manual_seed(0)
    first = boxes(5)
    torch.rand(100)  # other users of the global RNG do not matter
    assert boxes(5, order=reversed(range(6))) == first  # nor does the order
    assert boxes(6) != first and boxes(5, epoch=1) != first
    # Persistent DataLoader workers see set_epoch made in the main process.
    dataset = MedSegDataset(catalog.take(range(6)), train=True, seed=5)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = {int(i): tuple(b.tolist()) for batch in loader for i, b in zip(batch["index"], batch["box"])}
        assert seen == boxes(5, epoch=epoch)


@pytest.mark.parametrize("size, fg", [((1, 1), (0, 0, 0, 0)), ((64, 64), (10, 20, 40, 33)), ((37, 300), (5, 3, 290, 30)),
                                      ((640, 480), (0, 0, 479, 639))])
def test_box_covers_the_resized_label_exactly(tmp_path, size, fg):
    """At any input size the box prompt is the tight box of the 256 label the prediction is scored against."""
    folder = tmp_path / "ID" / "DS" / "CT_Liver"
    write_pair(folder, "a.npy", np.zeros((*size, 3), dtype=np.uint8), box_mask(size, fg))
    sample = MedSegDataset(open_catalog(tmp_path / "ID", use_cache=False))[0]
    ys, xs = torch.nonzero(sample["label"][0], as_tuple=True)
    assert sample["box"].tolist() == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    if size == (1, 1):
        assert sample["box"].tolist() == [0, 0, 255, 255] and bool(sample["label"].all())
