"""The canonical slice stack: one path from an image to the slices the model sees, and back.

Volumes are re-ordered (a pure axis permutation/flip, no interpolation) to the LPS orientation
before slicing, so axial slices show anterior at the top and the patient's right on the image's
left whatever the storage order (``orient="none"`` keeps the stored order). Coronal and sagittal
slices are flipped so that superior is at the top. Each slice is then intensity-mapped and
resampled to 256 x 256 (:mod:`medsegx.data.intensity`).

:func:`slice_stack` / :func:`model_slice` and their inverse :func:`mask_to_plane` /
:func:`put_plane` / :func:`stack_to_image` are used by conversion (``prepare_data.py``) and by
prediction (``medsegx.inference``, ``predict.py``) alike; :func:`write_back_prediction` puts
predicted slices of a converted case back into its original geometry from its ``meta.json`` entry.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .grid import SLICE_SIZE
from .intensity import (
    intensity_bounds,
    resize_image,
    resize_mask,
    to_display,
    to_uint8_rgb,
)
from .layout import parse_slice_name
from .presets import (
    AXES,
    AXIAL,
    CORONAL,
    DEFAULT_AXIS,
    DEFAULT_ORIENT,
    DEFAULT_PERCENTILES,
    HU_MODALITIES,
    KEEP_ORDER,
    LPS,
    ORIENTATION_WORDS,
    ORIENTATIONS,
    default_window,
)
from .sources import check_image_dimensions, image_geometry

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
    if axis == AXIAL:
        return 0, (sy, sx), sz
    if axis == CORONAL:
        return 1, (sz, sx), sy
    return 2, (sz, sy), sx


def _take(volume: np.ndarray, axis: int, k: int, flip_rows: bool) -> np.ndarray:
    plane = np.take(volume, k, axis=axis)
    return plane[::-1] if flip_rows else plane


# --------------------------------------------------------------------------- the canonical slice stack


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


def slice_stack(image: sitk.Image, source: str | Path, axis: str = DEFAULT_AXIS, orient: str = DEFAULT_ORIENT) -> SliceStack:
    """The canonical slice stack of a 2-D or 3-D image read from ``source`` (a file or DICOM folder).

    Volumes are re-ordered to LPS (``orient="LPS"``, a permutation/flip without interpolation) or
    kept in stored order (``"none"``) and sliced along ``axis``; coronal and sagittal slices are
    flipped to put superior at the top. Raises :class:`ConversionError` naming ``source`` for a 4-D
    or vector-valued volume.
    """
    source = Path(source)
    if axis not in AXES or orient not in ORIENTATIONS:
        raise ValueError(f"axis must be one of {AXES} and orient {ORIENTATION_WORDS}, got {axis!r}, {orient!r}")
    check_image_dimensions(image, source)
    is_2d = image.GetDimension() == 2
    arr = sitk.GetArrayFromImage(image)
    geometry = image_geometry(image)
    if is_2d:
        if arr.ndim == 3:
            arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0]
        volume = arr[None]
        perm, flip, axis_i, flip_rows = [0, 1, 2], [False, False, False], 0, False
        sx, sy = geometry["spacing"]
        in_plane, thickness = (sy, sx), 1.0
    else:
        perm, flip = orientation_plan(geometry["direction"]) if orient == LPS else ([0, 1, 2], [False] * 3)
        volume = _to_canonical(arr, perm, flip)
        canonical_spacing = [geometry["spacing"][p] for p in perm]
        axis_i, in_plane, thickness = _slice_plane(canonical_spacing, axis)
        flip_rows = orient == LPS and axis != AXIAL
    shape = list(volume.shape[:3])
    plane_shape = [n for i, n in enumerate(shape) if i != axis_i]
    record = {
        "kind": "image2d" if is_2d else ("dicom" if source.is_dir() else "volume"),
        **geometry,
        "orientation": None if is_2d else sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            geometry["direction"]),
        "canonical": None if is_2d or orient == KEEP_ORDER else LPS,
        "perm": perm, "flip": flip, "axis": None if is_2d else axis, "flip_rows": flip_rows,
        "canonical_shape": shape, "n_slices": int(shape[axis_i]),
        "slice_shape": plane_shape, "slice_spacing": [float(v) for v in in_plane],
        "slice_thickness": float(thickness),
        "spacing_256": [in_plane[0] * plane_shape[0] / SLICE_SIZE, in_plane[1] * plane_shape[1] / SLICE_SIZE],
    }
    return SliceStack(volume, record, is_8bit=is_2d and arr.dtype == np.uint8)


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
    return to_uint8_rgb(resize_image(display))


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
