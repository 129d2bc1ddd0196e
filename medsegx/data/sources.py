"""Source images and their labels: finding them, pairing them, reading them with their geometry checked.

Sources
-------
* volumes SimpleITK reads: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
  (``.mha``, ``.mhd``);
* DICOM series: a folder of slices (read with ``sitk.ImageSeriesReader``); its label is a volume
  file named like the folder;
* 2-D image/mask pairs: PNG, JPEG, BMP, TIFF.

Images and labels are paired by file-name stem (``case01.nii.gz`` <-> ``case01.nrrd``); a label
may carry a suffix (``_seg``, ``_mask``, ``_label``, ``_gt``, ``_segmentation``) and an image the
nnU-Net channel suffix ``_0000``. A volume file that holds less data than its header declares is
refused (:mod:`medsegx.data.integrity`); a label must share its image's size, spacing, origin and
direction.
"""
from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ConversionError
from .integrity import IncompleteFileError, check_complete

logger = logging.getLogger(__name__)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".ima")
LABEL_SUFFIXES = ("", "_seg", "_mask", "_label", "_labels", "_gt", "_segmentation", "_Segmentation")
IMAGE_SUFFIXES = ("_0000",)  # nnU-Net channel suffix: case_0000.nii.gz pairs with case.nii.gz

SERIES_UID_TAG = "0020|000e"  # DICOM SeriesInstanceUID, set on images read from a series folder
OTHER_SERIES_KEY = "medsegx|other_series"  # "uid:files;..." of the series of that folder not read


# --------------------------------------------------------------------------- finding and pairing


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


# --------------------------------------------------------------------------- reading


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


def image_geometry(img: sitk.Image) -> dict:
    """Size, spacing, origin and direction of ``img`` as JSON-ready lists (ITK order)."""
    return {
        "size": list(img.GetSize()),
        "spacing": [float(v) for v in img.GetSpacing()],
        "origin": [float(v) for v in img.GetOrigin()],
        "direction": [float(v) for v in img.GetDirection()],
    }


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


def check_geometry(image: sitk.Image, label: sitk.Image, image_path: Path, label_path: Path,
                   tolerance: float = 0.01) -> None:
    """Raise :class:`ConversionError` unless image and label share size, spacing, origin, direction.

    ``tolerance`` is a fraction of a voxel (origin, spacing) and an absolute cosine (direction).
    """
    gi, gl = image_geometry(image), image_geometry(label)
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
