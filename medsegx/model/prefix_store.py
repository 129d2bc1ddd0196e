"""Frozen-prefix features on disk, shared by every run that uses the same backbone.

LiteMedSAM's layers before the first adapted block are frozen and see only the image, so their output
for a slice is the same in every recipe, seed and epoch of a study. :class:`PrefixStore` keeps it in a
folder, one file per slice, named by a digest of

- the prefix itself: its parameters and buffers (the backbone weights), how many steps it has, the
  code path (fast or stock: they agree to float rounding, not bit for bit) and the torch version;
- the image the prefix saw, byte for byte (so the slice file and every preprocessing choice are in it).

An entry is a plain tensor file (read with ``weights_only=True``), written atomically; two processes
writing the same entry write the same bytes. A file that cannot be read is recomputed and replaced,
with a warning.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import atomic_write

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = ".prefix.pt"


class PrefixCacheError(UserError, OSError):
    """The cache folder cannot be used (a one-line error before any work)."""


def prefix_digest(modules: Iterable[nn.Module], n_steps: int, fast: bool) -> str:
    """A digest of the frozen prefix: every parameter and buffer (names, shapes, bytes), the number
    of steps, the code path and the torch version."""
    h = hashlib.sha256(f"steps={n_steps};fast={fast};torch={torch.__version__}".encode())
    for i, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PrefixStore:
    """One folder of prefix features for one prefix (``digest`` from :func:`prefix_digest`)."""

    def __init__(self, root: str | Path, digest: str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrefixCacheError(f"--prefix_cache_dir {self.root}: cannot create it ({err.strerror or err})") from None
        self.digest = digest
        self.stats = {"read": 0, "written": 0}

    def key(self, image: torch.Tensor) -> str:
        """The entry name of one image (``3 x H x W``, as the prefix receives it)."""
        t = image.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.sha256(self.digest.encode())
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def load(self, key: str) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """(features in memory order, their order) of ``key``, or None when absent or unreadable."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features, order = entry["features"], tuple(int(d) for d in entry["order"].tolist())
        except Exception as err:  # a truncated or foreign file: recompute it
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            logger.warning("prefix cache: %s is unreadable (%s); recomputing it", path, reason)
            return None
        self.stats["read"] += 1
        return features, order

    def save(self, key: str, features: torch.Tensor, order: tuple[int, ...]) -> None:
        """Write one entry atomically (:func:`medsegx.fileio.atomic_write`)."""
        entry = {"features": features.detach().to("cpu").contiguous().clone(), "order": torch.tensor(order, dtype=torch.int64)}
        atomic_write(self._path(key), lambda handle: torch.save(entry, handle))
        self.stats["written"] += 1
