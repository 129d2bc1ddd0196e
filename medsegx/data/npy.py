"""One slice pair, checked cheaply: the npy header, the image's dtype/shape/size, the mask read in full.

What can be wrong with a slice or a folder has a kind (the constants below, the one list of them); a check that fails raises :class:`BadSlice` carrying its kind. The catalog's index runs
:func:`check_pair` on every pair of a leaf folder; the dataset reads masks with :func:`read_npy_mask`.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import DataError
from .layout import IMAGES_DIR, MASKS_DIR

# Problem kinds. Every one skips the slice (or the folder), or raises with strict=True.
MISSING_MASK = "missing_mask"  # image without a mask of the same name
MISSING_IMAGE = "missing_image"  # mask without an image
UNREADABLE = "unreadable"  # not an npy file, truncated, or cannot be opened
NOT_NPY = "not_npy"  # a file without the .npy suffix in npy_imgs/npy_gts
BAD_IMAGE = "bad_image"  # image dtype or shape not supported
BAD_MASK = "bad_mask"  # mask dtype or shape not supported
SIZE_MISMATCH = "size_mismatch"  # image and mask of different height/width
EMPTY_MASK = "empty_mask"  # no foreground: a box prompt needs a target
LAYOUT = "layout"  # a folder that does not fit the MedSegDB layout
UNKNOWN_MODALITY = "unknown_modality"  # task folder whose modality is not in the taxonomy


class BadSlice(DataError):
    """A slice file that fails a check: ``kind`` is one of the problem kinds, ``detail`` says what is wrong."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


_HEADER_MEMO: dict[bytes, tuple[tuple[int, ...], np.dtype, bool]] = {}
_HEAD_READ = 256  # bytes read first: the whole header of any ordinary npy file (usually 128)


def _parse_npy_header(head: bytes, read_more: Callable[[int], bytes]) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the first bytes of an npy file; raises BadSlice."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise BadSlice(UNREADABLE, "not a .npy file (bad magic bytes)" if len(head) >= 6 else "empty or truncated file")
    major = head[6]
    if major == 1:
        end = 10 + int.from_bytes(head[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(head[8:12], "little")
    else:
        raise BadSlice(UNREADABLE, f"unsupported .npy format version {major}")
    if end > len(head):
        head += read_more(end - len(head))
        if end > len(head):
            raise BadSlice(UNREADABLE, "truncated .npy header")
    raw = head[:end]
    cached = _HEADER_MEMO.get(raw)
    if cached is None:
        # Headers repeat across a folder (same shape and dtype): parse each distinct one once.
        try:
            stream = io.BytesIO(raw)
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
        except (ValueError, OSError, SyntaxError) as err:
            raise BadSlice(UNREADABLE, f"corrupt .npy header ({err})") from None
        cached = (tuple(shape), dtype, bool(fortran))
        if len(_HEADER_MEMO) < 4096:
            _HEADER_MEMO[raw] = cached
    return (*cached, end)


def _check_image(path: str) -> tuple[int, int]:
    """Image (H,W[,1|3]) uint8, from its header and file size only -> (H, W); raises BadSlice."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            shape, dtype, _, offset = _parse_npy_header(os.read(fd, _HEAD_READ), lambda n: os.read(fd, n))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as err:
        raise BadSlice(UNREADABLE, f"cannot read image: {err}") from None
    if dtype != np.uint8:
        raise BadSlice(BAD_IMAGE, f"image dtype {dtype} is not supported: images must be uint8 0..255 "
                              "(window/rescale 16-bit or float data when converting)")
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))) or 0 in shape:
        raise BadSlice(BAD_IMAGE, f"image shape {shape} is not (H,W), (H,W,1) or (H,W,3)")
    expected = offset + math.prod(shape)
    if size < expected:
        raise BadSlice(UNREADABLE, f"truncated image file ({size} of {expected} bytes)")
    return shape[0], shape[1]


def read_npy_mask(path: str | Path) -> np.ndarray:
    """Read a mask file fully, checked -> (H,W) array (a trailing axis of 1 is dropped) of a bool,
    integer or float dtype, values as stored; raises BadSlice."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            # One read of the whole (small) file; a second only for an unusually long header.
            data = os.read(fd, max(os.fstat(fd).st_size, _HEAD_READ))
            shape, dtype, fortran, offset = _parse_npy_header(data, lambda n: os.read(fd, n))
        finally:
            os.close(fd)
    except OSError as err:
        raise BadSlice(UNREADABLE, f"cannot read mask: {err}") from None
    if dtype.hasobject or dtype.kind not in "buif":
        raise BadSlice(BAD_MASK, f"mask dtype {dtype} is not supported (expected uint8 0/1)")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(data) < offset + nbytes:
        raise BadSlice(UNREADABLE, f"truncated mask file ({len(data)} of {offset + nbytes} bytes)")
    mask = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    mask = mask.reshape(shape, order="F" if fortran else "C")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or 0 in mask.shape:
        raise BadSlice(BAD_MASK, f"mask shape {shape} is not (H,W) or (H,W,1)")
    return mask


def check_pair(image_path: str, mask_path: str) -> tuple[str, str, str, int]:
    """Check one pair -> (problem kind or "", detail, ``IMAGES_DIR``/``MASKS_DIR``: the file at fault,
    label_max). A usable pair has kind ""; its label_max > 1 flags a mask that needs binarising."""
    try:
        height, width = _check_image(image_path)
    except BadSlice as bad:
        return bad.kind, bad.detail, IMAGES_DIR, 0
    try:
        mask = read_npy_mask(mask_path)
    except BadSlice as bad:
        return bad.kind, bad.detail, MASKS_DIR, 0
    if mask.shape != (height, width):
        return SIZE_MISMATCH, f"image is {height}x{width} but mask is {mask.shape[0]}x{mask.shape[1]}", MASKS_DIR, 0
    label_max = mask.max()
    if not label_max > 0:
        return EMPTY_MASK, "mask has no foreground (a box prompt needs a target)", MASKS_DIR, 0
    binary = label_max == 1 and (mask.dtype.kind in "bu" or mask.min() >= 0)
    return "", "", "", 0 if binary else max(2, int(np.ceil(label_max)))
