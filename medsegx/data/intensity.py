"""Intensities and resampling of a slice: a CT window or percentile bounds -> 0..255, resized to 256.

CT and CTA are windowed with the window of the task (:mod:`medsegx.data.presets`); every other
modality is clipped to percentiles of the case's non-zero voxels (zero background stays 0),
following the widely used MedSAM preprocessing recipe. Images are resized anti-aliased (Gaussian
pre-filter, then linear), masks nearest-neighbour on pixel centres.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .grid import SLICE_SIZE
from .presets import DEFAULT_PERCENTILES, HU_MODALITIES, default_window


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


def resize_image(image: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
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


def resize_mask(mask: np.ndarray, shape: tuple[int, int] = (SLICE_SIZE, SLICE_SIZE)) -> np.ndarray:
    """Nearest-neighbour resize on pixel centres of a (H, W) mask to ``shape``; dtype kept."""
    mask = np.asarray(mask)
    return mask[np.ix_(_nearest_index(mask.shape[0], shape[0]), _nearest_index(mask.shape[1], shape[1]))]


def to_uint8_rgb(display: np.ndarray) -> np.ndarray:
    """0..255 floats (grey or colour) -> (H, W, 3) uint8, rounded and clipped."""
    out = np.clip(np.rint(display), 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out[..., :3])
