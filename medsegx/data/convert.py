"""Conversion of labelled volumes and 2-D image/mask pairs into MedSegDB slices.

Sources
-------
* volumes SimpleITK reads: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
  (``.mha``, ``.mhd``);
* DICOM series: a folder of slices (read with ``sitk.ImageSeriesReader``); its label is a volume
  file named like the folder;
* 2-D image/mask pairs: PNG, JPEG, BMP, TIFF.

Images and labels are paired by file-name stem (``case01.nii.gz`` <-> ``case01.nrrd``); a label
may carry a suffix (``_seg``, ``_mask``, ``_label``, ``_gt``, ``_segmentation``) and an image the
nnU-Net channel suffix ``_0000``.

Output (MedSegDB, see DESIGN.md section 3)
-----------------------------------------
* ID / training layout: ``out/Dataset/Modality_Task/[Sequence/]npy_imgs|npy_gts/``
* new OOD site: ``out/Modality_Task/Dataset/[Sequence/]finetune|inference/npy_imgs|npy_gts/``,
  split per case (a case never lands on both sides), seeded.

A slice is ``npy_imgs/casenum_{case}_sliceid_{k}.npy`` (256, 256, 3) uint8 and
``npy_gts/<same name>`` (256, 256) uint8 0/1, ``k`` being the slice index along the slicing axis.
A multi-label mask becomes one ``Modality_Task`` folder per entry of the label map; only slices
holding foreground of that task are written unless ``keep_empty``.

Intensity
---------
CT and CTA are windowed (level/width in HU); every other modality (MRI, CBCT, US, ...) is clipped
to the 0.5-99.5 percentiles of the case's non-zero voxels (zero background stays 0), following the
widely used MedSAM preprocessing recipe. 2-D inputs that are already 8-bit are kept as
they are (RGB stays RGB, grey is replicated to 3 channels). Default CT windows by task:

=============  ===========  ======  ============================================================
preset         level (HU)   width   default for (CT tasks; trailing digits of the task dropped)
=============  ===========  ======  ============================================================
abdomen        40           400     every CT task not listed below (liver, kidney, pancreas,
                                    spleen, stomach, colon, tumours, ...), the MedSAM default
liver          60           160     none by default (narrow contrast-enhanced liver window;
                                    ``--window liver``)
lung           -600         1500    lungs, airways, COVID, GGO, consolidation, pneumothorax,
                                    lung cancer, interstitial thickening, pulmonary fibrosis
mediastinum    50           350     heart and its chambers, esophagus, pleural effusion
bone           400          1800    spine, sacrum, hips, femur, tibia, collar bones, mandible,
                                    teeth
brain          40           80      brain tumours, haemorrhage, stroke lesions, brain tissues
head_neck      50           350     nasopharynx/neck GTVs, glottis, thyroid, parotid, ears
angio          300          600     vessels (aorta, pulmonary artery/embolism, carotid, dissection
                                    lumina); also the default for modality CTA
=============  ===========  ======  ============================================================

Geometry
--------
Volumes are re-ordered (a pure axis permutation/flip, no interpolation) to the LPS orientation
before slicing, so axial slices show anterior at the top and the patient's right on the image's
left whatever the storage order (``orient="none"`` keeps the stored order). Coronal and sagittal
slices are flipped so that superior is at the top. Each slice is resampled to 256 x 256: images
anti-aliased (Gaussian pre-filter, then linear), masks nearest-neighbour on pixel centres.

Every task folder holds ``meta.json``: per case the source files, the original size, spacing,
origin, direction and orientation, the axis permutation/flips, the in-plane shape and spacing of
a slice before and after resampling (``spacing_256``, millimetres per pixel of the 256 grid:
rows, cols), the intensity mapping, and per slice (by file name) its case, slice id, split and
``spacing_256``. :func:`slice_spacing` reads the latter for physical metrics;
:func:`write_back_prediction` uses a case entry to write predicted slices back as a volume in the
original geometry. :func:`slice_stack` / :func:`model_slice` and their inverse :func:`mask_to_plane` /
:func:`stack_to_image` are this one path from an image to the model's slices and back; prediction
(``medsegx.inference``, ``predict.py``) goes through them too.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import UserError
from .integrity import IncompleteFileError, check_complete

logger = logging.getLogger(__name__)

TARGET_SIZE = 256
META_FILE = "meta.json"
META_FORMAT = "medsegx-convert/1"

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".ima")
LABEL_SUFFIXES = ("", "_seg", "_mask", "_label", "_labels", "_gt", "_segmentation", "_Segmentation")
IMAGE_SUFFIXES = ("_0000",)  # nnU-Net channel suffix: case_0000.nii.gz pairs with case.nii.gz

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "head_neck": (50.0, 350.0),
    "angio": (300.0, 600.0),
}

_TASK_PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "lung": ("LeftLung", "RightLung", "Lung", "LungCancer", "COVID", "GroundGlassesOpacities",
             "Consolidation", "LungPneumothorax", "Bronchus", "PulmonaryAirways",
             "InterstitialThickening", "PulmonaryLibrosis"),
    "mediastinum": ("Heart", "LeftAtrium", "LeftVentricle", "RightVentricle", "LeftAtrialBloodChamber",
                    "RightAtrialBloodChamber", "LeftVentricularBloodChamber",
                    "RightVentricularBloodChamber", "LeftVentricularMyocardium",
                    "RightVentricularMyocardium", "LeftVentricleEpicardium", "Esophagus",
                    "PleuraEffusion"),
    "bone": ("Mandible", "CervicalSpine", "ThoracicSpine", "LumbarSpine", "Sacrum", "LeftHip",
             "RightHip", "FemurBone", "TibiaBone", "CollarBone", "LeftCollarBone", "RightCollarBone",
             "Tooth"),
    "brain": ("BrainWholeTumor", "BrainCoreTumor", "BrainEnhancingTumor", "IntracranialHemorrhage",
              "IschemicStrokeLesion", "WhiteMatter", "GrayMatter", "CerebroSpinalFluid", "LeftCaudatum",
              "RightCaudatum", "Hippocampus", "Pituitary", "VestibularSchwannoma"),
    "head_neck": ("GTVnx", "GTVnd", "Glottis", "PharynxCancer", "GlndThyroid", "ThyroidNodule",
                  "ParotidL", "GindSubmandL", "RightInnerEar", "LeftMiddleEar", "Lip", "CavityOral",
                  "BuccalMucosa"),
    "angio": ("Aorta", "AscendingAorta", "PulmonaryArtery", "PulmonaryEmbolism", "CarotidArteryRight",
              "CarotidVesselWall", "TL", "FL", "FLT", "Postcava"),
}
TASK_WINDOW: dict[str, str] = {task: preset for preset, tasks in _TASK_PRESET_GROUPS.items() for task in tasks}
DEFAULT_CT_PRESET = "abdomen"
DEFAULT_CTA_PRESET = "angio"
HU_MODALITIES = frozenset({"CT", "CTA"})
DEFAULT_PERCENTILES = (0.5, 99.5)

AXES = ("axial", "coronal", "sagittal")
_NAME_RE = re.compile(r"^[A-Za-z0-9-]+$")


class ConversionError(UserError, ValueError):
    """A case that cannot be converted; the message names the offending file and the problem."""


# --------------------------------------------------------------------------- configuration


@dataclass
class ConvertConfig:
    """What to convert and where to.

    ``labels_map`` maps a task name (``Liver``) to the label values that form it (``(1,)``; several
    values are merged, e.g. kidney = kidney + tumour). ``window`` overrides the per-task CT window
    (level, width). ``finetune_fraction`` is the fraction of cases going to ``finetune/`` for an
    OOD site (0 puts every case in ``inference/``).
    """

    modality: str
    dataset: str
    labels_map: dict[str, tuple[int, ...]]
    out: Path
    sequence: str | None = None
    ood_site: bool = False
    finetune_fraction: float = 0.5
    seed: int = 0
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    axis: str = "axial"
    keep_empty: bool = False
    min_pixels: int = 1
    slice_step: int = 1
    orient: str = "LPS"
    geometry_tolerance: float = 0.01
    case_ids: str = "stem"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        # the task folder is split on its first '_', so a modality must not hold one (datasets may)
        if not re.fullmatch(r"[A-Za-z0-9-]+", self.modality or ""):
            raise ValueError(f"invalid modality {self.modality!r}: letters, digits and '-' only (e.g. CT, MRI)")
        if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
            raise ValueError(f"invalid dataset name {self.dataset!r}")
        if self.sequence is not None and (not self.sequence or "/" in self.sequence):
            raise ValueError(f"invalid sequence {self.sequence!r}")
        if not self.labels_map:
            raise ValueError("labels_map is empty: give at least one 'value:Task'")
        for task in self.labels_map:
            if not re.fullmatch(r"[A-Za-z0-9]+", task):
                raise ValueError(f"invalid task name {task!r}: letters and digits only (e.g. LiverCancer)")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.orient not in ("LPS", "none"):
            raise ValueError(f"orient must be 'LPS' or 'none', got {self.orient!r}")
        if not 0.0 <= self.finetune_fraction <= 1.0:
            raise ValueError(f"finetune_fraction must lie in [0, 1], got {self.finetune_fraction}")
        if self.slice_step < 1 or self.min_pixels < 1:
            raise ValueError(f"slice_step and min_pixels must be >= 1, got {self.slice_step} and {self.min_pixels}")
        if self.case_ids not in ("stem", "index"):
            raise ValueError(f"case_ids must be 'stem' or 'index', got {self.case_ids!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")

    def task_folder(self, task: str) -> str:
        return f"{self.modality}_{task}"

    def meta_dir(self, task: str) -> Path:
        """Folder holding ``meta.json`` (and, for the ID layout, ``npy_imgs``/``npy_gts``)."""
        if self.ood_site:
            path = self.out / self.task_folder(task) / self.dataset
        else:
            path = self.out / self.dataset / self.task_folder(task)
        return path / self.sequence if self.sequence else path

    def slice_dir(self, task: str, split: str | None) -> Path:
        """Folder holding ``npy_imgs``/``npy_gts`` for ``task`` (and ``split`` on an OOD site)."""
        if self.ood_site:
            if split not in ("finetune", "inference"):
                raise ValueError(f"an OOD site needs split 'finetune' or 'inference', got {split!r}")
            return self.meta_dir(task) / split
        return self.meta_dir(task)


def parse_labels_map(text: str | Mapping) -> dict[str, tuple[int, ...]]:
    """``"1:Liver,2:LiverCancer"`` (or a JSON file / mapping of the same) -> ``{task: label values}``.

    ``"1+2:Kidney"`` merges values into one task; a task named twice collects both values.
    """
    if isinstance(text, Mapping):
        items = [(str(k), str(v)) for k, v in text.items()]
    elif str(text).endswith(".json"):
        path = Path(text)
        try:
            items = [(str(k), str(v)) for k, v in json.loads(path.read_text(encoding="utf-8")).items()]
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path}: cannot read the label map ({err})") from err
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if ":" not in part:
                raise ValueError(f"label map entry {part!r} is not 'value:Task' (in {text!r})")
            key, task = part.split(":", 1)
            items.append((key.strip(), task.strip()))
    out: dict[str, list[int]] = {}
    for key, task in items:
        try:
            values = [int(v) for v in key.split("+")]
        except ValueError as err:
            raise ValueError(f"label map key {key!r} is not an integer label value") from err
        if any(v <= 0 for v in values):
            raise ValueError(f"label value {key!r} must be positive (0 is background)")
        out.setdefault(task, []).extend(values)
    if not out:
        raise ValueError(f"empty label map {text!r}")
    return {task: tuple(sorted(set(values))) for task, values in out.items()}


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``"40,400"`` or a preset name (``"lung"``) -> (level, width); ``None`` -> ``None``."""
    if text is None or text == "":
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"window {text!r} is neither 'level,width' nor one of {sorted(WINDOW_PRESETS)}") from err
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level, width


def default_window(modality: str, task: str) -> tuple[float, float]:
    """The documented CT window (level, width) for ``task`` (trailing digits ignored)."""
    base = re.sub(r"\d+$", "", task)
    if base in TASK_WINDOW:
        return WINDOW_PRESETS[TASK_WINDOW[base]]
    return WINDOW_PRESETS[DEFAULT_CTA_PRESET if modality == "CTA" else DEFAULT_CT_PRESET]


# --------------------------------------------------------------------------- input discovery


def strip_extension(name: str) -> str:
    """File name without its (possibly double, e.g. ``.nii.gz``) image extension."""
    lower = name.lower()
    for ext in VOLUME_EXTENSIONS + IMAGE2D_EXTENSIONS + DICOM_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _is_supported_file(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(ext) for ext in VOLUME_EXTENSIONS + IMAGE2D_EXTENSIONS)


def _is_dicom_dir(path: Path) -> bool:
    """A folder of DICOM files: ``.dcm``/``.ima`` files, or extension-less files GDCM recognises."""
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in DICOM_EXTENSIONS for p in files):
        return True
    # only ask GDCM (which warns on stderr when it finds nothing) about extension-less files
    if any(p.suffix == "" for p in files) and not any(_is_supported_file(p) for p in files):
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    return False


def find_images(images: str | Path) -> list[Path]:
    """Inputs named by a folder or a glob: image files and DICOM series folders, sorted.

    A folder that itself holds DICOM files is one series; otherwise its supported files and its
    sub-folders that hold DICOM series are the inputs.
    """
    spec = str(images)
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(spec))]
    else:
        root = Path(spec)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such image file or folder")
        if root.is_file() or _is_dicom_dir(root):
            return [root]
        matches = sorted(root.iterdir())
    found = [p for p in matches if _is_supported_file(p) or _is_dicom_dir(p)]
    if not found:
        raise FileNotFoundError(f"{spec}: no NIfTI/NRRD/MHA/PNG/JPG image or DICOM series found")
    return found


def _label_index(labels: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in sorted(labels.iterdir()):
        if _is_supported_file(path):
            index.setdefault(strip_extension(path.name), []).append(path)
    return index


def find_label(image: Path, labels: Path, index: dict[str, list[Path]] | None = None) -> Path:
    """The label file in folder ``labels`` whose stem matches ``image`` (see module doc)."""
    index = _label_index(labels) if index is None else index
    stem = strip_extension(image.name)
    stems = [stem] + [stem[: -len(s)] for s in IMAGE_SUFFIXES if stem.endswith(s)]
    for base in stems:
        for suffix in LABEL_SUFFIXES:
            hits = [h for h in index.get(base + suffix, []) if h.resolve() != image.resolve()]
            if len(hits) > 1:
                raise ConversionError(f"{image}: several labels match: {', '.join(map(str, hits))}")
            if hits:
                return hits[0]
    raise ConversionError(f"{image}: no label named {stem}[{'|'.join(s for s in LABEL_SUFFIXES if s)}].* in {labels}")


def case_id_from_path(path: Path) -> str:
    """Case id from a file stem: characters other than letters, digits and '-' become '-'.

    Underscores are replaced because ``casenum_{case}_sliceid_{k}`` uses them as separators.
    """
    stem = strip_extension(path.name)
    for suffix in IMAGE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    case = re.sub(r"[^A-Za-z0-9-]+", "-", stem).strip("-")
    if not case:
        raise ConversionError(f"{path}: cannot derive a case id from the file name")
    return case


def slice_name(case: str, k: int) -> str:
    return f"casenum_{case}_sliceid_{k}.npy"


def parse_slice_name(name: str) -> tuple[str, int]:
    """``casenum_{case}_sliceid_{k}.npy`` -> (case, k)."""
    match = re.fullmatch(r"casenum_(.+)_sliceid_(\d+)(?:\.npy)?", Path(name).name)
    if not match:
        raise ValueError(f"{name!r} is not a casenum_<case>_sliceid_<k>.npy slice name")
    return match.group(1), int(match.group(2))


# --------------------------------------------------------------------------- reading


SERIES_UID_TAG = "0020|000e"  # DICOM SeriesInstanceUID, set on images read from a series folder
OTHER_SERIES_KEY = "medsegx|other_series"  # "uid:files;..." of the series of that folder not read


def read_image(path: str | Path) -> sitk.Image:
    """A volume file, a 2-D image, or a DICOM series folder as a SimpleITK image.

    A volume whose file holds less data than its header declares is refused (see
    :mod:`medsegx.data.integrity`). Of a folder with several DICOM series
    the one with the most files is read; its SeriesInstanceUID is kept in the image's metadata
    (``SERIES_UID_TAG``) and the others in ``OTHER_SERIES_KEY``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ConversionError(f"{path}: folder holds no readable DICOM series")
            files = {sid: reader.GetGDCMSeriesFileNames(str(path), sid) for sid in series}
            chosen = max(series, key=lambda sid: len(files[sid]))
            if len(series) > 1:
                logger.warning("%s: %d DICOM series, using %s (%d files)", path, len(series), chosen, len(files[chosen]))
            reader.SetFileNames(files[chosen])
            image = reader.Execute()
            image.SetMetaData(SERIES_UID_TAG, chosen)
            others = [f"{sid}:{len(files[sid])}" for sid in series if sid != chosen]
            if others:
                image.SetMetaData(OTHER_SERIES_KEY, ";".join(others))
            return image
        if not path.exists():
            raise ConversionError(f"{path}: file not found")
        check_complete(path)
        return sitk.ReadImage(str(path))
    except ConversionError:
        raise
    except IncompleteFileError as err:
        raise ConversionError(str(err)) from None
    except RuntimeError as err:  # SimpleITK raises RuntimeError for unreadable files
        first = str(err).strip().splitlines()
        raise ConversionError(f"{path}: cannot read image ({first[-1] if first else err})") from err


def series_info(image: sitk.Image) -> dict:
    """The DICOM series an image was read from and the other series of its folder ({} for files)."""
    if not image.HasMetaDataKey(SERIES_UID_TAG):
        return {}
    others = image.GetMetaData(OTHER_SERIES_KEY) if image.HasMetaDataKey(OTHER_SERIES_KEY) else ""
    return {"series_uid": image.GetMetaData(SERIES_UID_TAG),
            "other_series": {uid: int(n) for uid, n in (item.rsplit(":", 1) for item in others.split(";") if item)}}


def _geometry(img: sitk.Image) -> dict:
    return {
        "size": list(img.GetSize()),
        "spacing": [float(v) for v in img.GetSpacing()],
        "origin": [float(v) for v in img.GetOrigin()],
        "direction": [float(v) for v in img.GetDirection()],
    }


def check_geometry(image: sitk.Image, label: sitk.Image, image_path: Path, label_path: Path,
                   tolerance: float = 0.01) -> None:
    """Raise :class:`ConversionError` unless image and label share size, spacing, origin, direction.

    ``tolerance`` is a fraction of a voxel (origin, spacing) and an absolute cosine (direction).
    """
    gi, gl = _geometry(image), _geometry(label)
    where = f"label {label_path} does not match image {image_path}"
    if gi["size"] != gl["size"]:
        raise ConversionError(f"{where}: size {gl['size']} vs {gi['size']}")
    spacing = np.asarray(gi["spacing"])
    if np.any(np.abs(np.asarray(gl["spacing"]) - spacing) > tolerance * spacing):
        raise ConversionError(f"{where}: spacing {gl['spacing']} vs {gi['spacing']}")
    if np.any(np.abs(np.asarray(gl["origin"]) - np.asarray(gi["origin"])) > tolerance * spacing.min()):
        raise ConversionError(f"{where}: origin {gl['origin']} vs {gi['origin']}")
    if np.any(np.abs(np.asarray(gl["direction"]) - np.asarray(gi["direction"])) > tolerance):
        raise ConversionError(f"{where}: direction {gl['direction']} vs {gi['direction']}")


def check_label_geometry(image: sitk.Image | sitk.ImageFileReader, label: sitk.Image | sitk.ImageFileReader,
                         image_path: str | Path, label_path: str | Path, tolerance: float = 0.01) -> None:
    """A label must have its image's dimension and size (and for volumes spacing, origin and
    direction, see :func:`check_geometry`). Takes images or ``sitk.ImageFileReader`` headers."""
    dim = image.GetDimension()
    if label.GetDimension() != dim:
        raise ConversionError(f"label {label_path} is {label.GetDimension()}-D but image {image_path} is {dim}-D")
    if dim == 2:
        if tuple(image.GetSize()) != tuple(label.GetSize()):
            raise ConversionError(f"label {label_path} does not match image {image_path}: "
                                  f"size {list(label.GetSize())} vs {list(image.GetSize())}")
    else:
        try:
            check_geometry(image, label, Path(image_path), Path(label_path), tolerance)
        except ConversionError as err:
            series = series_info(image) if isinstance(image, sitk.Image) else {}
            if series.get("other_series"):
                others = ", ".join(f"{uid} ({n} files)" for uid, n in series["other_series"].items())
                raise ConversionError(f"{err}; {image_path} holds several DICOM series: {series['series_uid']} "
                                      f"({image.GetSize()[2]} slices) was read, the label may belong to "
                                      f"{others}: give each series its own folder") from None
            raise


def read_label(label_path: str | Path, image: sitk.Image, image_path: str | Path,
               tolerance: float = 0.01) -> np.ndarray:
    """The label of ``image`` (also a prompt or reference mask) as a non-negative integer array in the
    image's stored order, after :func:`check_label_geometry`. ``image`` may also be a
    ``sitk.ImageFileReader`` that has read the image's header. Raises :class:`ConversionError`.
    """
    label = read_image(label_path)
    check_label_geometry(image, label, image_path, label_path, tolerance)
    return _label_array(label, Path(label_path), image.GetDimension() == 2)


def _label_array(label: sitk.Image, path: Path, is_2d: bool) -> np.ndarray:
    arr = sitk.GetArrayFromImage(label)
    if label.GetNumberOfComponentsPerPixel() > 1:
        # RGB(A) masks: accept only when the colour channels agree (a grey mask saved as RGB)
        rgb = arr[..., :3]
        if not np.all(rgb == rgb[..., :1]):
            raise ConversionError(f"{path}: colour label with differing channels; give a single-channel mask")
        arr = rgb[..., 0]
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if np.any(np.abs(arr - rounded) > 1e-3):
            raise ConversionError(f"{path}: label holds non-integer values (is it an image?)")
        arr = rounded
    arr = arr.astype(np.int32)
    if arr.min() < 0:
        raise ConversionError(f"{path}: label holds negative values")
    if arr.ndim != (2 if is_2d else 3):
        raise ConversionError(f"{path}: label has {arr.ndim} dimensions, expected {2 if is_2d else 3}")
    return arr


# --------------------------------------------------------------------------- orientation


def orientation_plan(direction: Sequence[float]) -> tuple[list[int], list[bool]]:
    """Axis permutation and flips that bring a 3-D image to LPS without interpolation.

    ``direction`` is SimpleITK's row-major 3x3 matrix whose column i is the physical direction of
    index axis i. Returns ``perm, flip``: canonical (ITK-order) axis j is stored axis ``perm[j]``,
    reversed when ``flip[j]``. Oblique images go to the closest axis.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    perm, flip = [-1, -1, -1], [False, False, False]
    for flat in np.argsort(-np.abs(d), axis=None):
        phys, idx = divmod(int(flat), 3)
        if perm[phys] == -1 and idx not in perm:
            perm[phys], flip[phys] = idx, bool(d[phys, idx] < 0)
    return perm, flip


def _to_canonical(arr: np.ndarray, perm: Sequence[int], flip: Sequence[bool]) -> np.ndarray:
    """Stored numpy (z, y, x) array -> canonical (z, y, x) view."""
    out = np.transpose(arr, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
    for j in range(3):
        if flip[j]:
            out = np.flip(out, axis=2 - j)
    return out


def _from_canonical(arr: np.ndarray, perm: Sequence[int], flip: Sequence[bool]) -> np.ndarray:
    """Inverse of :func:`_to_canonical`."""
    for j in range(3):
        if flip[j]:
            arr = np.flip(arr, axis=2 - j)
    axes = [2 - perm[2], 2 - perm[1], 2 - perm[0]]
    return np.transpose(arr, np.argsort(axes))


def _slice_plane(canonical_spacing: Sequence[float], axis: str) -> tuple[int, tuple[float, float], float]:
    """Numpy axis sliced, in-plane (row, col) spacing and slice thickness for ``axis``."""
    sx, sy, sz = canonical_spacing
    if axis == "axial":
        return 0, (sy, sx), sz
    if axis == "coronal":
        return 1, (sz, sx), sy
    return 2, (sz, sy), sx


def _take(volume: np.ndarray, axis: int, k: int, flip_rows: bool) -> np.ndarray:
    plane = np.take(volume, k, axis=axis)
    return plane[::-1] if flip_rows else plane


# --------------------------------------------------------------------------- intensity and resampling


def intensity_bounds(volume: np.ndarray, modality: str, task: str, window: tuple[float, float] | None,
                     percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> dict:
    """How a case's intensities map to 0..255: a CT window or the case's percentile bounds."""
    if modality in HU_MODALITIES or window is not None:
        level, width = window if window is not None else default_window(modality, task)
        return {"mode": "window", "level": float(level), "width": float(width),
                "lo": float(level - width / 2), "hi": float(level + width / 2), "zero_background": False}
    values = volume[volume != 0]
    zero_background = values.size >= 0.01 * volume.size and values.size < volume.size
    if values.size < 0.01 * volume.size:
        values = volume.reshape(-1)
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return {"mode": "percentile", "percentiles": list(percentiles), "lo": lo, "hi": hi,
            "zero_background": bool(zero_background)}


def to_display(plane: np.ndarray, bounds: dict) -> np.ndarray:
    """Raw intensities -> float32 in 0..255 by ``bounds`` (from :func:`intensity_bounds`)."""
    lo, hi = bounds["lo"], bounds["hi"]
    out = (np.clip(plane.astype(np.float32), lo, hi) - lo) * np.float32(255.0 / max(hi - lo, 1e-6))
    if bounds.get("zero_background"):
        out[plane == 0] = 0.0
    return out


def resize_image(image: np.ndarray, size: int = TARGET_SIZE) -> np.ndarray:
    """Anti-aliased linear resize of (H, W) or (H, W, C) to (size, size[, C]) float32.

    A Gaussian pre-filter (sigma = (scale - 1) / 2 where shrinking) removes what the coarser grid
    cannot hold; sampling is on pixel centres.
    """
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.copy()
    scale = (h / size, w / size)
    sigma = [max(0.0, (s - 1.0) / 2.0) for s in scale]
    rows = (np.arange(size) + 0.5) * scale[0] - 0.5
    cols = (np.arange(size) + 0.5) * scale[1] - 0.5
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = []
    for ch in channels:
        if any(sigma):
            ch = ndimage.gaussian_filter(ch, sigma=sigma, mode="nearest")
        out.append(ndimage.map_coordinates(ch, grid, order=1, mode="nearest"))
    return out[0] if image.ndim == 2 else np.stack(out, axis=-1)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_mask(mask: np.ndarray, shape: tuple[int, int] = (TARGET_SIZE, TARGET_SIZE)) -> np.ndarray:
    """Nearest-neighbour resize on pixel centres of a (H, W) mask to ``shape``; dtype kept."""
    mask = np.asarray(mask)
    return mask[np.ix_(_nearest_index(mask.shape[0], shape[0]), _nearest_index(mask.shape[1], shape[1]))]


def _to_uint8_rgb(display: np.ndarray) -> np.ndarray:
    out = np.clip(np.rint(display), 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out[..., :3])


# --------------------------------------------------------------------------- the canonical slice stack
# One path from an image file to the slices the model sees, and back: conversion (prepare_data.py)
# and prediction (predict.py) both go through these functions.


@dataclass
class SliceStack:
    """An image as it is sliced: the stored array re-ordered to the canonical orientation.

    ``volume`` is numpy-ordered (z, y, x) after the axis permutation/flips (``[None]`` added for a
    2-D image; a colour image keeps its trailing channel axis). ``record`` holds the geometry
    fields of a ``meta.json`` case entry (``kind`` .. ``spacing_256``), which is all
    :func:`stack_to_image` needs to put a canonical array back into the original geometry.
    ``is_8bit``: a 2-D uint8 image (a photograph or screenshot), display-ready as it is.
    """

    volume: np.ndarray
    record: dict
    is_8bit: bool = False

    @property
    def is_2d(self) -> bool:
        return self.record["kind"] == "image2d"

    @property
    def axis_index(self) -> int:
        """The numpy axis of :attr:`volume` that is sliced."""
        return 0 if self.record["axis"] is None else AXES.index(self.record["axis"])

    @property
    def n_slices(self) -> int:
        return int(self.record["n_slices"])

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        """Another array of the image's stored shape (a label) in this stack's canonical order."""
        if self.is_2d:
            return stored[None]
        return _to_canonical(stored, self.record["perm"], self.record["flip"])

    def plane(self, k: int, volume: np.ndarray | None = None) -> np.ndarray:
        """Slice ``k`` of :attr:`volume` (or of a canonical ``volume`` of the same shape), rows as shown."""
        return _take(self.volume if volume is None else volume, self.axis_index, k, bool(self.record["flip_rows"]))


def slice_stack(image: sitk.Image, source: str | Path, axis: str = "axial", orient: str = "LPS") -> SliceStack:
    """The canonical slice stack of a 2-D or 3-D image read from ``source`` (a file or DICOM folder).

    Volumes are re-ordered to LPS (``orient="LPS"``, a permutation/flip without interpolation) or
    kept in stored order (``"none"``) and sliced along ``axis``; coronal and sagittal slices are
    flipped to put superior at the top. Raises :class:`ConversionError` naming ``source`` for a 4-D
    or vector-valued volume.
    """
    source = Path(source)
    if axis not in AXES or orient not in ("LPS", "none"):
        raise ValueError(f"axis must be one of {AXES} and orient 'LPS' or 'none', got {axis!r}, {orient!r}")
    check_image_dimensions(image, source)
    is_2d = image.GetDimension() == 2
    arr = sitk.GetArrayFromImage(image)
    geometry = _geometry(image)
    if is_2d:
        if arr.ndim == 3:
            arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0]
        volume = arr[None]
        perm, flip, axis_i, flip_rows = [0, 1, 2], [False, False, False], 0, False
        sx, sy = geometry["spacing"]
        in_plane, thickness = (sy, sx), 1.0
    else:
        perm, flip = orientation_plan(geometry["direction"]) if orient == "LPS" else ([0, 1, 2], [False] * 3)
        volume = _to_canonical(arr, perm, flip)
        canonical_spacing = [geometry["spacing"][p] for p in perm]
        axis_i, in_plane, thickness = _slice_plane(canonical_spacing, axis)
        flip_rows = orient == "LPS" and axis != "axial"
    shape = list(volume.shape[:3])
    plane_shape = [n for i, n in enumerate(shape) if i != axis_i]
    record = {
        "kind": "image2d" if is_2d else ("dicom" if source.is_dir() else "volume"),
        **geometry,
        "orientation": None if is_2d else sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            geometry["direction"]),
        "canonical": None if is_2d or orient == "none" else "LPS",
        "perm": perm, "flip": flip, "axis": None if is_2d else axis, "flip_rows": flip_rows,
        "canonical_shape": shape, "n_slices": int(shape[axis_i]),
        "slice_shape": plane_shape, "slice_spacing": [float(v) for v in in_plane],
        "slice_thickness": float(thickness),
        "spacing_256": [in_plane[0] * plane_shape[0] / TARGET_SIZE, in_plane[1] * plane_shape[1] / TARGET_SIZE],
    }
    return SliceStack(volume, record, is_8bit=is_2d and arr.dtype == np.uint8)


def check_image_dimensions(image: sitk.Image | sitk.ImageFileReader, source: str | Path) -> None:
    """A 2-D image (grey or colour) or a 3-D scalar volume; else :class:`ConversionError` naming ``source``.

    Also takes a ``sitk.ImageFileReader`` that has read the header, to check before reading pixels.
    """
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ConversionError(f"{source}: {dim}-D image not supported (split channels/time first)")
    get_components = getattr(image, "GetNumberOfComponentsPerPixel", None) or image.GetNumberOfComponents
    n_comp = get_components()
    if dim == 3 and n_comp > 1:
        raise ConversionError(f"{source}: vector-valued volume ({n_comp} components) not supported")


def stack_intensity(stack: SliceStack, modality: str, task: str, window: tuple[float, float] | None = None,
                    percentiles: tuple[float, float] = DEFAULT_PERCENTILES, cache: dict | None = None) -> dict:
    """The intensity mapping of ``stack`` for ``task`` (see :func:`intensity_bounds`).

    A 2-D 8-bit image without a forced ``window`` is kept as it is (``{"mode": "none"}``). Windows
    differ by task, percentile bounds do not: ``cache`` (a dict kept per case) computes each
    mapping once.
    """
    if stack.is_8bit and window is None:
        return {"mode": "none"}
    key = window or (default_window(modality, task) if modality in HU_MODALITIES else None)
    if cache is None:
        cache = {}
    if key not in cache:
        cache[key] = intensity_bounds(stack.volume, modality, task, window, percentiles)
    return cache[key]


def model_slice(stack: SliceStack, k: int, bounds: dict) -> np.ndarray:
    """Slice ``k`` as the model sees it: intensity-mapped, resampled, (256, 256, 3) uint8."""
    plane = stack.plane(k)
    display = plane.astype(np.float32) if bounds["mode"] == "none" else to_display(plane, bounds)
    return _to_uint8_rgb(resize_image(display))


def mask_to_plane(mask: np.ndarray, record: Mapping) -> np.ndarray:
    """A (256, 256) mask (> 0 is foreground) back onto its slice of the canonical stack: bool plane.

    The inverse of :func:`model_slice`'s resampling (nearest neighbour on pixel centres) and row flip.
    """
    plane = resize_mask(np.asarray(mask) > 0, tuple(record["slice_shape"]))
    return plane[::-1] if record.get("flip_rows") else plane


def put_plane(volume: np.ndarray, record: Mapping, k: int, plane: np.ndarray) -> None:
    """Write ``plane`` (from :func:`mask_to_plane`) as slice ``k`` of a canonical ``volume``."""
    axis_name = record.get("axis")
    index: list = [slice(None)] * 3
    index[0 if axis_name is None else AXES.index(axis_name)] = k
    volume[tuple(index)] = plane


def stack_to_image(volume: np.ndarray, record: Mapping) -> sitk.Image:
    """A canonical array (``record["canonical_shape"]``) as an image with the original size, spacing,
    origin and direction: the inverse of :func:`slice_stack`'s re-ordering (2-D images: 2-D)."""
    if record.get("kind") == "image2d":
        array = volume[0]
    else:
        array = np.ascontiguousarray(_from_canonical(volume, record["perm"], record["flip"]))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(record["spacing"])
    image.SetOrigin(record["origin"])
    image.SetDirection(record["direction"])
    return image


# --------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    """What one converted case wrote: per task, the meta entries and slice names."""

    case: str
    image: Path
    label: Path
    split: str | None
    entries: dict[str, dict] = field(default_factory=dict)     # task -> case entry for meta.json
    slices: dict[str, dict[str, dict]] = field(default_factory=dict)  # task -> {name: slice entry}
    absent: list[str] = field(default_factory=list)             # tasks with no foreground


def _remove_case_slices(cfg: ConvertConfig, task: str, case: str) -> None:
    """Delete earlier slices of ``case`` so a re-run never leaves stale ones (or one on each side)."""
    splits = ("finetune", "inference") if cfg.ood_site else (None,)
    pattern = f"casenum_{glob.escape(case)}_sliceid_*.npy"
    for split in splits:
        for sub in ("npy_imgs", "npy_gts"):
            for path in (cfg.slice_dir(task, split) / sub).glob(pattern):
                path.unlink()


def convert_case(image_path: str | Path, label_path: str | Path, cfg: ConvertConfig,
                 case: str | None = None, split: str | None = None) -> CaseResult:
    """Convert one image + label into slices of every task of ``cfg.labels_map``.

    Writes ``npy_imgs``/``npy_gts`` files and returns their meta entries (write them with
    :func:`update_meta`; :func:`convert_dataset` does both). Raises :class:`ConversionError` naming
    the file for unreadable input, a geometry mismatch or an unsupported image.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    case = case or case_id_from_path(image_path)
    if not _NAME_RE.match(case):
        raise ConversionError(f"{image_path}: case id {case!r} may hold letters, digits and '-' only")
    if cfg.ood_site and split is None:
        raise ConversionError(f"{image_path}: an OOD site conversion needs the case's split")
    image = read_image(image_path)
    stack = slice_stack(image, image_path, cfg.axis, cfg.orient)
    is_2d = stack.is_2d
    label_arr = read_label(label_path, image, image_path, cfg.geometry_tolerance)
    if is_2d and label_arr.max() > max(v for values in cfg.labels_map.values() for v in values) \
            and len(cfg.labels_map) == 1:
        # 0/255 (or lossy JPEG) masks of a single task: threshold at half range
        label_arr = (label_arr >= 128).astype(np.int32) * cfg.labels_map[next(iter(cfg.labels_map))][0]
    label_vol = stack.to_canonical(label_arr)

    known = {v for values in cfg.labels_map.values() for v in values}
    unknown = sorted(set(np.unique(label_vol).tolist()) - known - {0})
    if unknown:
        logger.warning("%s: label values %s are not in the label map; ignored", label_path, unknown)

    axis = stack.axis_index
    spacing_256 = stack.record["spacing_256"]
    result = CaseResult(case=case, image=image_path, label=label_path, split=split)
    bounds_cache: dict[tuple, dict] = {}
    image_cache: dict[tuple, np.ndarray] = {}
    other_axes = tuple(a for a in range(label_vol.ndim) if a != axis)

    for task, values in cfg.labels_map.items():
        task_mask = np.isin(label_vol, values)
        present = np.flatnonzero(task_mask.any(axis=other_axes))
        if present.size == 0:
            result.absent.append(task)
            logger.info("%s: no voxel of %s (values %s)", label_path, task, list(values))
        candidates = range(stack.n_slices) if cfg.keep_empty else present.tolist()
        candidates = list(candidates)[::cfg.slice_step]  # every slice_step-th: thins dense stacks
        bounds = stack_intensity(stack, cfg.modality, task, cfg.window, cfg.percentiles, bounds_cache)
        _remove_case_slices(cfg, task, case)
        out_dir = cfg.slice_dir(task, split)
        (out_dir / "npy_imgs").mkdir(parents=True, exist_ok=True)
        (out_dir / "npy_gts").mkdir(parents=True, exist_ok=True)
        written: list[int] = []
        for k in candidates:
            gt = resize_mask(stack.plane(k, task_mask)).astype(np.uint8)
            if not cfg.keep_empty and int(gt.sum()) < cfg.min_pixels:
                continue  # foreground too small to survive the 256 grid
            cache_key = (bounds.get("mode"), bounds.get("lo"), bounds.get("hi"), k)
            if cache_key not in image_cache:
                image_cache[cache_key] = model_slice(stack, k, bounds)
            name = slice_name(case, k)
            np.save(out_dir / "npy_imgs" / name, image_cache[cache_key])
            np.save(out_dir / "npy_gts" / name, gt)
            written.append(int(k))
        result.entries[task] = {
            "image": str(image_path), "label": str(label_path), "label_values": list(values),
            **stack.record, "split": split, "intensity": bounds, "slices": written,
            # a 2-D picture (PNG, JPEG, ...) carries no physical pixel size: no millimetre metrics
            "spacing_known": not is_2d, **series_info(image),
        }
        result.slices[task] = {
            slice_name(case, k): {"case": case, "sliceid": k, "split": split, "spacing_256": spacing_256}
            for k in written
        }
    return result


# --------------------------------------------------------------------------- meta.json


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: unreadable metadata ({err})") from err


def update_meta(cfg: ConvertConfig, results: Iterable[CaseResult]) -> list[Path]:
    """Merge the cases of ``results`` into each task folder's ``meta.json``; returns the files."""
    by_task: dict[str, list[CaseResult]] = {}
    for res in results:
        for task in res.entries:
            by_task.setdefault(task, []).append(res)
    written = []
    for task, results_of_task in by_task.items():
        path = cfg.meta_dir(task) / META_FILE
        meta = _read_json(path) if path.exists() else {}
        meta.update({
            "format": META_FORMAT, "modality": cfg.modality, "task": task,
            "task_folder": cfg.task_folder(task), "dataset": cfg.dataset, "sequence": cfg.sequence,
            "layout": "ood" if cfg.ood_site else "id", "target_size": TARGET_SIZE,
        })
        cases, slices = meta.setdefault("cases", {}), meta.setdefault("slices", {})
        renewed = {res.case for res in results_of_task}
        slices = {k: v for k, v in slices.items() if v.get("case") not in renewed}  # drop stale slices
        for res in results_of_task:
            cases[res.case] = res.entries[task]
            slices.update(res.slices[task])
        meta["slices"] = slices
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(_dump_meta(meta), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def _dump_meta(meta: dict) -> str:
    """JSON with one line per header field, per case and per slice: readable and diff-friendly."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, dict) and key in ("cases", "slices"):
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{body}\n }}" if value else f" {json.dumps(key)}: {{}}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def find_meta(slice_path: str | Path) -> Path | None:
    """``meta.json`` of the task folder a ``npy_imgs``/``npy_gts`` slice belongs to, if any."""
    folder = Path(slice_path).resolve().parent.parent
    for candidate in (folder, folder.parent):
        if (candidate / META_FILE).is_file():
            return candidate / META_FILE
    return None


@lru_cache(maxsize=64)
def _load_meta_cached(path: str, mtime: float) -> dict:
    return _read_json(Path(path))


def load_meta(path: str | Path) -> dict:
    """A ``meta.json`` (given it or its task folder), cached while the file is unchanged."""
    path = Path(path)
    if path.is_dir():
        path = path / META_FILE
    return _load_meta_cached(str(path), path.stat().st_mtime)


def slice_spacing(slice_path: str | Path) -> tuple[float, float] | None:
    """(row, col) millimetres per pixel of the 256 grid for a converted slice; None where unknown
    (no meta.json, or a 2-D picture, which has no physical pixel size)."""
    meta_path = find_meta(slice_path)
    if meta_path is None:
        return None
    meta = load_meta(meta_path)
    entry = meta.get("slices", {}).get(Path(slice_path).name)
    if entry is None:
        return None
    case = meta.get("cases", {}).get(entry.get("case"), {})
    if not case.get("spacing_known", case.get("kind") != "image2d"):
        return None
    return float(entry["spacing_256"][0]), float(entry["spacing_256"][1])


# --------------------------------------------------------------------------- write-back


def write_back_prediction(slices_dict: Mapping[int | str, np.ndarray], meta: Mapping,
                          out_path: str | Path | None = None, case: str | None = None,
                          label_value: int = 1) -> sitk.Image:
    """Stack predicted 256x256 slice masks into a volume in the case's original geometry.

    Args:
        slices_dict: slice id ``k`` or slice file name -> mask (256, 256) or (1, 256, 256), > 0 is
            foreground. Slices not given are background.
        meta: the case entry of ``meta.json`` (``meta["cases"][case]``), or the whole file with
            ``case`` given (or inferred from the slice names).
        out_path: where to write (any SimpleITK format, e.g. ``.nii.gz``); None writes nothing.
        label_value: value written for foreground.

    Returns:
        The uint8 image with the original size, spacing, origin and direction (2-D for 2-D inputs).
    """
    if "cases" in meta:
        if case is None:
            cases = {parse_slice_name(str(k))[0] for k in slices_dict if isinstance(k, str)}
            if len(cases) != 1:
                raise ValueError("give case= (or slice names of one case) to pick an entry of meta.json")
            case = cases.pop()
        meta = meta["cases"][case]
    shape = meta["canonical_shape"]
    axis_name = meta.get("axis")
    axis = 0 if axis_name is None else AXES.index(axis_name)
    volume = np.zeros(shape, dtype=np.uint8)
    for key, mask in slices_dict.items():
        k = parse_slice_name(key)[1] if isinstance(key, str) else int(key)
        if not 0 <= k < shape[axis]:
            raise ValueError(f"slice id {k} outside 0..{shape[axis] - 1}")
        mask = np.asarray(mask)
        mask = mask.reshape(mask.shape[-2:]) if mask.ndim == 3 else mask
        if mask.ndim != 2:
            raise ValueError(f"slice {key}: expected a (H, W) mask, got shape {mask.shape}")
        put_plane(volume, meta, k, mask_to_plane(mask, meta).astype(np.uint8) * np.uint8(label_value))
    image = stack_to_image(volume, meta)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(out_path), useCompression=True)
    return image


# --------------------------------------------------------------------------- batch conversion


def split_cases(cases: Iterable[str], finetune_fraction: float, seed: int = 0) -> dict[str, str]:
    """Per-case OOD split: ``round(fraction * n)`` seeded-random cases -> ``finetune``, rest ``inference``.

    With 0 < fraction < 1 and at least two cases, each side gets at least one case.
    """
    ids = sorted(set(cases))
    n_ft = int(math.floor(finetune_fraction * len(ids) + 0.5))
    if 0.0 < finetune_fraction < 1.0 and len(ids) >= 2:
        n_ft = min(max(n_ft, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i]: ("finetune" if rank < n_ft else "inference") for rank, i in enumerate(order)}


@dataclass
class ConversionSummary:
    """Outcome of a batch: converted cases, slices per task folder, counted skips."""

    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    slices: dict[str, int] = field(default_factory=dict)           # task folder -> slices written
    absent: dict[str, int] = field(default_factory=dict)           # task folder -> cases without it
    splits: dict[str, str] = field(default_factory=dict)           # case -> split (OOD site)
    meta_files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"converted {len(self.converted)} case(s), skipped {len(self.skipped)}"]
        lines += [f"  {task}: {n} slice(s)" + (f", absent in {self.absent[task]} case(s)" if self.absent.get(task) else "")
                  for task, n in sorted(self.slices.items())]
        if self.splits:
            n_ft = sum(s == "finetune" for s in self.splits.values())
            lines.append(f"  split: {n_ft} finetune / {len(self.splits) - n_ft} inference case(s)")
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def pair_inputs(images: str | Path, labels: str | Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Pair every image of ``images`` (folder or glob) with its label in folder ``labels``.

    Images and labels may share a folder (``case.nii.gz`` + ``case_seg.nii.gz``): files that are
    the label of another image are not taken as images. Returns the pairs and, as (path, reason),
    the images without a label and the labels without an image.
    """
    labels = Path(labels)
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels}: label folder not found")
    index = _label_index(labels)
    found: dict[Path, Path | str] = {}
    for image in find_images(images):
        try:
            found[image] = find_label(image, labels, index)
        except ConversionError as err:
            found[image] = str(err)
    # a label is matched from its image, never the other way round (case_seg has no case_seg_seg)
    used = {label.resolve() for label in found.values() if isinstance(label, Path)}
    pairs, missing = [], []
    for image, label in found.items():
        if image.resolve() in used:
            continue  # a label file sitting among the images
        if isinstance(label, str):
            missing.append((str(image), label))
        else:
            pairs.append((image, label))
    images_seen = {image.resolve() for image in found}
    for paths in index.values():
        for label in paths:
            if label.resolve() not in used and label.resolve() not in images_seen:
                missing.append((str(label), f"{label}: label without an image (no image named "
                                            f"{strip_extension(label.name)}.* in {images})"))
    return pairs, missing


def convert_dataset(images: str | Path, labels: str | Path, cfg: ConvertConfig,
                    strict: bool = False) -> ConversionSummary:
    """Convert every image/label pair; unreadable or mismatched cases are skipped and counted.

    With ``strict`` the first bad case raises :class:`ConversionError` instead. Raises
    :class:`ConversionError` too when no case at all could be converted.
    """
    pairs, missing = pair_inputs(images, labels)
    summary = ConversionSummary()
    for path, reason in missing:
        if strict:
            raise ConversionError(reason)
        logger.warning("skip: %s", reason)
        summary.skipped.append((path, reason))
    case_of: dict[Path, str] = {}
    if cfg.case_ids == "index":
        width = max(3, len(str(len(pairs))))
        case_of = {image: str(i).zfill(width) for i, (image, _) in enumerate(sorted(pairs))}
    else:
        seen: dict[str, Path] = {}
        for image, _ in pairs:
            case = case_id_from_path(image)
            if case in seen:
                raise ConversionError(f"{image}: case id {case!r} already used by {seen[case]}")
            seen[case] = image
            case_of[image] = case
    splits = split_cases(case_of.values(), cfg.finetune_fraction, cfg.seed) if cfg.ood_site else {}
    results: list[CaseResult] = []
    try:
        for image, label in pairs:
            case = case_of[image]
            try:
                res = convert_case(image, label, cfg, case=case, split=splits.get(case))
            except ConversionError as err:
                if strict:
                    raise
                logger.warning("skip: %s", err)
                summary.skipped.append((str(image), str(err)))
                continue
            results.append(res)
            summary.converted.append(case)
            if cfg.ood_site:
                summary.splits[case] = splits[case]
            for task, names in res.slices.items():
                folder = cfg.task_folder(task)
                summary.slices[folder] = summary.slices.get(folder, 0) + len(names)
            for task in res.absent:
                folder = cfg.task_folder(task)
                summary.absent[folder] = summary.absent.get(folder, 0) + 1
    finally:
        # written slices stay described even when a strict run stops half-way
        summary.meta_files = [str(p) for p in update_meta(cfg, results)]
    logger.info("converted %d case(s), skipped %d", len(summary.converted), len(summary.skipped))
    if not summary.converted:
        raise ConversionError(f"no case converted from {images} ({len(summary.skipped)} skipped):\n"
                              + summary.describe())
    return summary
