"""End-to-end checks of conversion (medsegx.data.convert and its stages) on small volumes, a DICOM series
and 2-D pairs."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegx.data.convert import ConvertConfig, convert_case, convert_dataset, parse_labels_map, split_cases
from medsegx.data.errors import ConversionError
from medsegx.data.layout import parse_slice_name
from medsegx.data.meta import load_meta, slice_spacing
from medsegx.data.presets import WINDOW_PRESETS, default_window, parse_window
from medsegx.data.sources import pair_inputs, read_image, strip_extension
from medsegx.data.volume import write_back_prediction

REPO = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (6, 48, 40)                     # numpy order: 6 slices of 48 rows x 40 cols
SPACING = (0.8, 0.7, 2.5)                   # ITK order x, y, z
ORIGIN = (10.0, -20.0, 5.0)
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # stored as RAS: x and y reversed vs LPS
LIVER = (slice(1, 5), slice(10, 30), slice(5, 25))       # z, y, x in the stored array
CANCER = (slice(2, 4), slice(15, 21), slice(10, 15))


def _ct_arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = np.full(SHAPE_ZYX, -1000, dtype=np.int16)
    image[:, 4:44, 2:38] = rng.integers(-20, 20, size=(6, 40, 36))      # body, water-like
    label = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    label[LIVER] = 1
    image[LIVER] = 60
    label[CANCER] = 2
    image[CANCER] = 20
    return image, label


def _to_image(arr: np.ndarray, direction=RAS_DIRECTION) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction)
    return img


def _write_case(images: Path, labels: Path, case: str, direction=RAS_DIRECTION, image_ext=".nii.gz",
                label_ext=".nii.gz") -> None:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    image, label = _ct_arrays()
    sitk.WriteImage(_to_image(image, direction), str(images / f"{case}{image_ext}"))
    sitk.WriteImage(_to_image(label, direction), str(labels / f"{case}{label_ext}"))


def _expected_span(first: int, last: int, n: int, size: int = 256) -> tuple[int, int]:
    """Rows/cols of the 256 grid whose nearest source pixel centre falls in [first, last]."""
    return math.ceil(first * size / n - 0.5), math.ceil((last + 1) * size / n - 0.5) - 1


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _cfg(out: Path, **kw) -> ConvertConfig:
    base = dict(modality="CT", dataset="MyHospital", labels_map=parse_labels_map("1:Liver,2:LiverCancer"), out=out)
    base.update(kw)
    return ConvertConfig(**base)


def test_parse_labels_map_and_window():
    assert parse_labels_map("1:Liver,2:LiverCancer") == {"Liver": (1,), "LiverCancer": (2,)}
    assert parse_labels_map("1+2:Kidney,3:Kidney") == {"Kidney": (1, 2, 3)}
    with pytest.raises(ValueError, match="value:Task"):
        parse_labels_map("Liver")
    assert parse_window("40,400") == (40.0, 400.0)
    assert parse_window("lung") == (-600.0, 1500.0)
    assert default_window("CT", "LeftLung") == WINDOW_PRESETS["lung"]
    assert default_window("CT", "Liver") == WINDOW_PRESETS["abdomen"]
    assert default_window("CTA", "Something") == WINDOW_PRESETS["angio"]
    assert strip_extension("case.nii.gz") == "case"


def test_volume_two_labels(tmp_path):
    _write_case(tmp_path / "images", tmp_path / "labels", "case_01")
    out = tmp_path / "train"
    summary = convert_dataset(tmp_path / "images", tmp_path / "labels", _cfg(out))
    assert summary.converted == ["case-01"] and not summary.skipped
    assert summary.slices == {"CT_Liver": 4, "CT_LiverCancer": 2}

    nz, ny, nx = SHAPE_ZYX
    for task, value, region in (("Liver", 1, LIVER), ("LiverCancer", 2, CANCER)):
        folder = out / "MyHospital" / f"CT_{task}"
        names = sorted(p.name for p in (folder / "npy_gts").iterdir())
        assert names == sorted(f"casenum_case-01_sliceid_{k}.npy" for k in range(region[0].start, region[0].stop))
        assert sorted(p.name for p in (folder / "npy_imgs").iterdir()) == names
        # stored RAS -> LPS reverses x and y; the tight box of the label bounds the region's voxels
        x0, x1 = nx - region[2].stop, nx - 1 - region[2].start
        y0, y1 = ny - region[1].stop, ny - 1 - region[1].start
        exp_x, exp_y = _expected_span(x0, x1, nx), _expected_span(y0, y1, ny)
        for name in names:
            gt = np.load(folder / "npy_gts" / name)
            img = np.load(folder / "npy_imgs" / name)
            assert gt.shape == (256, 256) and gt.dtype == np.uint8 and set(np.unique(gt)) <= {0, 1}
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert np.array_equal(img[..., 0], img[..., 2])
            assert _box(gt) == (exp_x[0], exp_y[0], exp_x[1], exp_y[1])
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        case = meta["cases"]["case-01"]
        assert case["size"] == [nx, ny, nz] and case["label_values"] == [value]
        assert case["spacing"] == pytest.approx(SPACING)
        assert case["origin"] == pytest.approx(ORIGIN)
        assert case["direction"] == pytest.approx(RAS_DIRECTION)
        assert case["orientation"] == "RAS" and case["canonical"] == "LPS"
        assert case["slice_shape"] == [ny, nx]
        assert case["slice_spacing"] == pytest.approx([SPACING[1], SPACING[0]])
        assert case["spacing_256"] == pytest.approx([SPACING[1] * ny / 256, SPACING[0] * nx / 256])
        assert case["slice_thickness"] == pytest.approx(SPACING[2])
        assert case["intensity"]["level"] == 40.0 and case["intensity"]["width"] == 400.0
        assert set(meta["slices"]) == set(names)
        assert slice_spacing(folder / "npy_imgs" / names[0]) == pytest.approx(tuple(case["spacing_256"]))

    # liver (60 HU) in the abdomen window 40/400 -> (60 + 160) / 400 * 255; air -> 0
    liver = np.load(out / "MyHospital" / "CT_Liver" / "npy_imgs" / "casenum_case-01_sliceid_1.npy")
    gt = np.load(out / "MyHospital" / "CT_Liver" / "npy_gts" / "casenum_case-01_sliceid_1.npy")
    inner = gt.astype(bool) & np.roll(gt, 8, 0).astype(bool) & np.roll(gt, -8, 0).astype(bool)
    inner &= np.roll(gt, 8, 1).astype(bool) & np.roll(gt, -8, 1).astype(bool)
    assert abs(float(np.median(liver[inner, 0])) - 220 / 400 * 255) <= 1.5
    assert liver[0, 0, 0] == 0


def test_dicom_series(tmp_path):
    image, label = _ct_arrays()
    series = tmp_path / "dicom" / "case02"
    series.mkdir(parents=True)
    vol = _to_image(image, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(vol.GetDepth()):
        s = vol[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|0032", "\\".join(str(v) for v in vol.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0018|0050", str(SPACING[2]))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(_to_image(label, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), str(tmp_path / "labels" / "case02.nrrd"))

    out = tmp_path / "train"
    summary = convert_dataset(tmp_path / "dicom", tmp_path / "labels", _cfg(out, labels_map={"Liver": (1,)}))
    assert summary.converted == ["case02"] and summary.slices == {"CT_Liver": 4}
    folder = out / "MyHospital" / "CT_Liver"
    case = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["cases"]["case02"]
    assert case["kind"] == "dicom"
    assert case["spacing"] == pytest.approx(SPACING, abs=1e-4)
    assert case["size"] == [SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0]]
    # identity direction: no flips, so the box follows the stored indices directly
    gt = np.load(folder / "npy_gts" / "casenum_case02_sliceid_2.npy")
    exp_x = _expected_span(LIVER[2].start, LIVER[2].stop - 1, SHAPE_ZYX[2])
    exp_y = _expected_span(LIVER[1].start, LIVER[1].stop - 1, SHAPE_ZYX[1])
    assert _box(gt) == (exp_x[0], exp_y[0], exp_x[1], exp_y[1])


def test_png_pair(tmp_path):
    rng = np.random.default_rng(1)
    rgb = np.empty((60, 80, 3), dtype=np.uint8)
    rgb[:] = (200, 160, 140)
    rgb += rng.integers(0, 10, size=rgb.shape, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[20:41, 30:61] = 255
    rgb[mask > 0] = (90, 50, 30)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "img" / "ISIC_0001.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "msk" / "ISIC_0001_segmentation.png"))

    out = tmp_path / "train"
    cfg = ConvertConfig(modality="Dermoscopy", dataset="ISIC", labels_map={"Skin": (1,)}, out=out)
    summary = convert_dataset(tmp_path / "img", tmp_path / "msk", cfg)
    assert summary.slices == {"Dermoscopy_Skin": 1}
    folder = out / "ISIC" / "Dermoscopy_Skin"
    img = np.load(folder / "npy_imgs" / "casenum_ISIC-0001_sliceid_0.npy")
    gt = np.load(folder / "npy_gts" / "casenum_ISIC-0001_sliceid_0.npy")
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and set(np.unique(gt)) == {0, 1}
    exp_x, exp_y = _expected_span(30, 60, 80), _expected_span(20, 40, 60)
    assert _box(gt) == (exp_x[0], exp_y[0], exp_x[1], exp_y[1])
    # 8-bit RGB is kept: lesion colour inside, skin colour outside
    assert np.abs(img[gt.astype(bool)].mean(0) - (90, 50, 30)).max() < 3
    assert np.abs(img[:10, :10].reshape(-1, 3).mean(0) - (204.5, 164.5, 144.5)).max() < 3
    back = write_back_prediction({"casenum_ISIC-0001_sliceid_0.npy": gt}, load_meta(folder),
                                    tmp_path / "pred.png", label_value=255)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred.png"))), mask)
    assert back.GetSize() == (80, 60)


def test_ood_split_disjoint_and_seeded(tmp_path):
    for i in range(7):
        _write_case(tmp_path / "images", tmp_path / "labels", f"p{i}", image_ext=".mha", label_ext=".mha")
    out = tmp_path / "cross_site"
    cfg = _cfg(out, ood_site=True, finetune_fraction=0.5, seed=3, labels_map={"Liver": (1,)}, modality="MRI",
               sequence="T2")
    summary = convert_dataset(str(tmp_path / "images" / "*.mha"), tmp_path / "labels", cfg)
    site = out / "MRI_Liver" / "MyHospital" / "T2"
    cases = {}
    for split in ("finetune", "inference"):
        names = list((site / split / "npy_imgs").iterdir())
        cases[split] = {parse_slice_name(p.name)[0] for p in names}
        assert len(names) == 4 * len(cases[split])
    assert not cases["finetune"] & cases["inference"]
    assert cases["finetune"] | cases["inference"] == {f"p{i}" for i in range(7)}
    assert len(cases["finetune"]) == 4
    meta = json.loads((site / "meta.json").read_text(encoding="utf-8"))
    assert {c: e["split"] for c, e in meta["cases"].items()} == summary.splits
    assert split_cases([f"p{i}" for i in range(7)], 0.5, 3) == summary.splits
    assert split_cases([f"p{i}" for i in range(7)], 0.5, 4) != summary.splits
    assert set(split_cases(["a", "b"], 0.9, 0).values()) == {"finetune", "inference"}
    # MRI uses percentile clipping, recorded per case
    assert meta["cases"]["p0"]["intensity"]["mode"] == "percentile"


@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_write_back_round_trip(tmp_path, axis):
    _write_case(tmp_path / "images", tmp_path / "labels", "rt")
    out = tmp_path / "train"
    convert_dataset(tmp_path / "images", tmp_path / "labels", _cfg(out, axis=axis))
    _, label = _ct_arrays()
    for task, value in (("Liver", 1), ("LiverCancer", 2)):
        folder = out / "MyHospital" / f"CT_{task}"
        meta = load_meta(folder)
        preds = {p.name: np.load(p) for p in (folder / "npy_gts").iterdir()}
        path = tmp_path / "pred" / f"{task}.nii.gz"
        write_back_prediction(preds, meta, path)
        back = sitk.ReadImage(str(path))
        assert back.GetSize() == (SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0])
        assert back.GetSpacing() == pytest.approx(SPACING)
        assert back.GetOrigin() == pytest.approx(ORIGIN)
        assert back.GetDirection() == pytest.approx(RAS_DIRECTION)
        assert np.array_equal(sitk.GetArrayFromImage(back), (label == value).astype(np.uint8))


def test_bad_inputs_error_or_counted_skip(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    _write_case(images, labels, "good")
    (images / "broken.nii.gz").write_bytes(b"not a nifti")
    (labels / "broken.nii.gz").write_bytes(b"not a nifti")
    _write_case(images, labels, "nolabel")
    (labels / "nolabel.nii.gz").unlink()
    image, label = _ct_arrays()
    sitk.WriteImage(_to_image(image), str(images / "shifted.nii.gz"))
    sitk.WriteImage(_to_image(label[:, :, :30]), str(labels / "shifted.nii.gz"))

    cfg = _cfg(tmp_path / "train")
    with pytest.raises(ConversionError, match="broken.nii.gz"):
        convert_case(images / "broken.nii.gz", labels / "broken.nii.gz", cfg)
    with pytest.raises(ConversionError, match=r"shifted.nii.gz.*size"):
        convert_case(images / "shifted.nii.gz", labels / "shifted.nii.gz", cfg)

    summary = convert_dataset(images, labels, cfg)
    assert summary.converted == ["good"]
    skipped = dict(summary.skipped)
    assert set(skipped) == {str(images / n) for n in ("broken.nii.gz", "nolabel.nii.gz", "shifted.nii.gz")}
    assert "no label" in skipped[str(images / "nolabel.nii.gz")]
    assert "skipped 3" in summary.describe()
    with pytest.raises(ConversionError, match="nolabel"):
        convert_dataset(images, labels, cfg, strict=True)


def test_cli(tmp_path):
    _write_case(tmp_path / "images", tmp_path / "labels", "cli_case_0000", label_ext="_seg.nii.gz")
    (tmp_path / "labels" / "cli_case_0000_seg.nii.gz").rename(tmp_path / "labels" / "cli_case_seg.nii.gz")
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.get_args_parser().parse_args([
        "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--modality", "CT",
        "--labels_map", "1:Liver,2:LiverCancer", "--dataset", "MyHospital", "--out", str(tmp_path / "eval"),
        "--ood_site", "--finetune_fraction", "0", "--window", "lung", "--keep_empty",
    ])
    summary = module.main(args)
    assert summary.converted == ["cli-case"]
    folder = tmp_path / "eval" / "CT_LiverCancer" / "MyHospital" / "inference"
    assert len(list((folder / "npy_imgs").iterdir())) == SHAPE_ZYX[0]  # --keep_empty keeps all slices
    meta = load_meta(tmp_path / "eval" / "CT_LiverCancer" / "MyHospital")
    assert meta["cases"]["cli-case"]["intensity"]["level"] == -600.0


def test_cli_shows_progress_per_case_and_a_closing_summary(tmp_path, capsys):
    for case in ("a", "b"):
        _write_case(tmp_path / "images", tmp_path / "labels", case)
    _write_case(tmp_path / "images", tmp_path / "unused", "orphan")  # an image without a label
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(module.get_args_parser().parse_args([
        "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--modality", "CT",
        "--labels_map", "1:Liver", "--dataset", "MyHospital", "--out", str(tmp_path / "train")]))
    out, err = capsys.readouterr()
    assert "converting" in err and "2/2" in err  # the bar: one step per converted pair
    assert out.startswith("converted 2 case(s), skipped 1\n")
    assert "CT_Liver: 8 slice(s)" in out and "skipped " + str(tmp_path / "images" / "orphan.nii.gz") in out
    assert "no label named orphan" in out  # and why


def test_images_and_labels_in_one_folder(tmp_path):
    _write_case(tmp_path, tmp_path, "a", label_ext="_seg.nii.gz")
    _write_case(tmp_path, tmp_path, "b", label_ext="_seg.nii.gz")
    pairs, missing = pair_inputs(tmp_path, tmp_path)
    assert not missing
    assert [(i.name, lab.name) for i, lab in pairs] == [("a.nii.gz", "a_seg.nii.gz"), ("b.nii.gz", "b_seg.nii.gz")]


# --------------------------------------------------------------------------- damaged and misleading input


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_volume_is_refused(tmp_path, ext, keep):
    images, labels = tmp_path / "images", tmp_path / "labels"
    _write_case(images, labels, "cut", image_ext=ext)
    _write_case(images, labels, "whole", image_ext=ext)
    path = images / f"cut{ext}"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConversionError, match=r"cut.*truncated"):
        read_image(path)
    summary = convert_dataset(images, labels, _cfg(tmp_path / "train"))
    assert summary.converted == ["whole"]
    assert "truncated" in dict(summary.skipped)[str(path)]
    with pytest.raises(ConversionError, match="truncated"):
        convert_dataset(images, labels, _cfg(tmp_path / "train2"), strict=True)


def test_compressed_nrrd_truncated_is_refused(tmp_path):
    image, _ = _ct_arrays()
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(_to_image(image), str(path), useCompression=True)
    assert read_image(path).GetSize() == (SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ConversionError, match="truncated"):
        read_image(path)


def test_png_has_no_millimetres(tmp_path):
    from medsegx import reports

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    rgb = np.full((60, 80, 3), 120, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[10:40, 20:50] = 255
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "img" / "p1.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "lab" / "p1.png"))
    out = tmp_path / "train"
    convert_dataset(tmp_path / "img", tmp_path / "lab", _cfg(out, modality="Dermoscopy", labels_map={"Skin": (1,)}))
    folder = out / "MyHospital" / "Dermoscopy_Skin"
    case = load_meta(folder)["cases"]["p1"]
    assert case["kind"] == "image2d" and case["spacing_known"] is False
    assert slice_spacing(next((folder / "npy_imgs").iterdir())) is None
    row = reports.SliceResult("MyHospital/Dermoscopy_Skin/casenum_p1_sliceid_0.npy", dsc=0.9, hd=3.0, hd95_mm=None)
    details = reports.format_details_md([row], "t")
    task_line = next(line for line in details.splitlines() if line.startswith("| Dermoscopy_Skin"))
    assert "n/a" in task_line


def _write_series(folder: Path, image: np.ndarray, series_uid: str, z_offset: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vol = _to_image(image, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    vol.SetOrigin((ORIGIN[0], ORIGIN[1], ORIGIN[2] + z_offset))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.GetDepth()):
        s = vol[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.3.4"), ("0020|000e", series_uid),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|0032", "\\".join(str(v) for v in vol.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0018|0050", str(SPACING[2]))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_folder_with_two_series(tmp_path):
    image, label = _ct_arrays()
    folder = tmp_path / "dicom" / "case03"
    _write_series(folder, image, "1.2.3.4.100")                   # 6 slices: the one read
    _write_series(folder, image[:4], "1.2.3.4.200", z_offset=100)  # 4 slices
    (tmp_path / "labels").mkdir()
    ident = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    sitk.WriteImage(_to_image(label, direction=ident), str(tmp_path / "labels" / "case03.nrrd"))
    summary = convert_dataset(tmp_path / "dicom", tmp_path / "labels", _cfg(tmp_path / "train", labels_map={"Liver": (1,)}))
    assert summary.converted == ["case03"]
    case = load_meta(tmp_path / "train" / "MyHospital" / "CT_Liver")["cases"]["case03"]
    assert case["series_uid"] == "1.2.3.4.100" and case["other_series"] == {"1.2.3.4.200": 4}
    # a label drawn on the other series: the error names both series
    sitk.WriteImage(_to_image(label[:4], direction=ident), str(tmp_path / "labels" / "case03.nrrd"))
    with pytest.raises(ConversionError, match=r"1\.2\.3\.4\.100.*1\.2\.3\.4\.200 \(4 files\)"):
        convert_case(folder, tmp_path / "labels" / "case03.nrrd", _cfg(tmp_path / "t2", labels_map={"Liver": (1,)}))


def test_orphan_label_is_reported(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    _write_case(images, labels, "a")
    _write_case(images, labels, "b")
    (images / "b.nii.gz").unlink()
    summary = convert_dataset(images, labels, _cfg(tmp_path / "train"))
    assert summary.converted == ["a"]
    reason = dict(summary.skipped)[str(labels / "b.nii.gz")]
    assert "label without an image" in reason


def test_slice_step_keeps_every_nth_target_slice(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    _write_case(images, labels, "c")
    every = convert_dataset(images, labels, _cfg(tmp_path / "all", labels_map={"Liver": (1,)}))
    thin = convert_dataset(images, labels, _cfg(tmp_path / "thin", labels_map={"Liver": (1,)}, slice_step=2))
    names = sorted(p.name for p in (tmp_path / "all" / "MyHospital" / "CT_Liver" / "npy_gts").iterdir())
    kept = sorted(p.name for p in (tmp_path / "thin" / "MyHospital" / "CT_Liver" / "npy_gts").iterdir())
    assert every.slices == {"CT_Liver": 4} and thin.slices == {"CT_Liver": 2}
    assert kept == sorted(sorted(names, key=lambda n: int(n.split("_")[-1][:-4]))[::2])
    with pytest.raises(ValueError, match="slice_step"):
        _cfg(tmp_path / "x", slice_step=0)
