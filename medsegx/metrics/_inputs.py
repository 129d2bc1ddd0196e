"""Input normalisation shared by the metric families: binary mask batches and pixel spacing.

Every public metric accepts numpy arrays or torch tensors shaped
``B x H x W``, ``B x 1 x H x W`` (2-D slices) or ``B x D x H x W``, ``B x 1 x D x H x W``
(3-D volumes), with bool or 0/1 values, and returns one float64 value per batch item.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SpacingLike = float | Sequence[float] | np.ndarray | None

# Names accepted by every metric's ``empty=`` parameter (see each function for what they return).
EMPTY_POLICIES = ("monai", "published", "nan")


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of ``x``; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def spatial_dims_of(spacing: SpacingLike, spatial_dims: int | None) -> int | None:
    """The number of spatial axes implied by an explicit argument or by a per-axis spacing."""
    if spatial_dims is not None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        return spatial_dims
    if spacing is None or np.ndim(spacing) == 0:
        return None
    n = np.shape(spacing)[-1]
    if n == 1:
        return None
    if n not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 entries per item, got shape {np.shape(spacing)}")
    return int(n)


def as_mask_batch(x: Any, name: str, spatial_dims: int | None = None) -> np.ndarray:
    """Binary mask batch as a C-contiguous bool array ``B x *spatial``.

    ``B x H x W`` is 2-D; ``B x 1 x H x W`` is 2-D with a channel (squeezed) unless
    ``spatial_dims == 3``; ``B x D x H x W`` with ``D > 1`` is 3-D; ``B x 1 x D x H x W`` is 3-D.
    Non-bool input must hold only 0 and 1 (probabilities and logits are rejected, not thresholded).
    """
    a = to_numpy(x)
    if a.dtype != np.bool_:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"{name}: expected a bool or 0/1 numeric mask, got dtype {a.dtype}")
        b = a != 0
        if a.size and not np.array_equal(b, a == 1):
            raise ValueError(f"{name}: values must be binary (0/1 or bool); threshold probabilities first")
        a = b
    if a.ndim == 3:
        if spatial_dims == 3:
            raise ValueError(f"{name}: 3-D metrics need B x D x H x W, got shape {a.shape}")
    elif a.ndim == 4:
        if a.shape[1] == 1 and spatial_dims != 3:
            a = a[:, 0]
        elif spatial_dims == 2:
            raise ValueError(f"{name}: 2-D metrics need B x H x W or B x 1 x H x W, got shape {a.shape}")
    elif a.ndim == 5:
        if a.shape[1] != 1 or spatial_dims == 2:
            raise ValueError(f"{name}: 3-D input must be B x 1 x D x H x W, got shape {a.shape}")
        a = a[:, 0]
    else:
        raise ValueError(f"{name}: expected B x [1 x] H x W or B x [1 x] D x H x W, got shape {a.shape}")
    return np.ascontiguousarray(a)


def as_pair(pred: Any, gt: Any, spacing: SpacingLike = None,
            spatial_dims: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``gt`` as bool batches of one shape (see :func:`as_mask_batch`)."""
    nd = spatial_dims_of(spacing, spatial_dims)
    p = as_mask_batch(pred, "pred", nd)
    g = as_mask_batch(gt, "gt", nd)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    return p, g


def spacing_per_item(spacing: SpacingLike, batch: int, ndim: int) -> np.ndarray:
    """Spacing as a float64 array ``B x ndim``.

    Accepts None (unit spacing), a scalar (isotropic), one value per spatial axis
    (shared by the batch) or ``B x ndim`` (one row per item).
    """
    if spacing is None:
        return np.ones((batch, ndim))
    s = np.asarray(spacing, dtype=np.float64)
    if s.ndim == 0 or s.shape == (1,):
        s = np.full((batch, ndim), float(s.reshape(())))
    elif s.ndim == 1:
        if s.shape[0] != ndim:
            raise ValueError(f"spacing has {s.shape[0]} entries but the masks have {ndim} spatial axes")
        s = np.broadcast_to(s, (batch, ndim))
    elif s.ndim == 2:
        if s.shape != (batch, ndim):
            raise ValueError(f"per-item spacing must be {(batch, ndim)}, got {s.shape}")
    else:
        raise ValueError(f"spacing must be a scalar, a sequence or B x ndim, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be positive and finite, got {s.tolist()}")
    return np.ascontiguousarray(s)


def check_policy(empty: str) -> str:
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    return empty
