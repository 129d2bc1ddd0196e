"""The one dataset class: slice records -> model-ready samples (image, label, box prompt, context)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .catalog import SliceRecord
from .errors import DataError
from .grid import PAPER_BOX_JITTER, SLICE_SIZE
from .npy import BadSlice, read_npy_mask

logger = logging.getLogger(__name__)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image slice (memory-mapped) -> (H,W,3) uint8; grayscale (H,W) or (H,W,1) is
    replicated to 3 channels. Other dtypes are refused: 16-bit or float data must be windowed to
    0..255 when converting (a silent rescale would change what intensities mean per slice)."""
    try:
        image = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err
    if image.dtype != np.uint8:
        raise DataError(f"{path}: image dtype {image.dtype} is not supported; images must be uint8 0..255")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{path}: image shape {image.shape} is not (H,W), (H,W,1) or (H,W,3)")
    return np.array(image)  # a private, writable copy of the memory map


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask slice -> (H,W) uint8 0/1, binarised as ``mask > 0`` (labels 255 or several classes)."""
    try:
        mask = read_npy_mask(path)
    except BadSlice as bad:
        raise DataError(f"{path}: {bad.detail}") from None
    return (mask > 0).astype(np.uint8)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of the foreground of a (H,W) mask -> (4,) int64 x_min, y_min, x_max, y_max
    (inclusive pixel indices). Raises ValueError on an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.int64)


class MedSegDataset(Dataset):
    """Serves slice records as model samples.

    ``__getitem__`` returns a dict (default collate stacks it):
      - "image": float32 (3,S,S), values 0..255 (the model normalises); S = ``image_size`` (256)
      - "label": int64 (1,S,S) 0/1
      - "box":   float32 (4,) x_min, y_min, x_max, y_max on the S-grid; each side pushed out by a
                 random 0..``jitter`` px (clipped to the image) only when ``train=True``
      - "modal": int64 scalar; "organ": int64 (4,) body part, subregion, organ, task
      - "name":  the record's report key; "index": position in ``records``
    A slice of another size is resized to S (image bilinear with antialiasing, mask nearest on pixel
    centres); the box is the tight box of that resized mask. ``train`` belongs to this instance: a validation dataset over part of
    the same records is a second instance with ``train=False``.

    ``strict=False`` (training only): a slice that cannot be read any more (changed after indexing)
    is logged, counted in ``skipped`` and replaced by a nearby one; ``strict=True`` and evaluation
    datasets raise :class:`DataError` naming the file. ``seed``: see :meth:`_jitter` and :meth:`set_epoch`.
    """

    def __init__(self, records: Sequence[SliceRecord], *, train: bool = False, image_size: int = SLICE_SIZE,
                 jitter: int = PAPER_BOX_JITTER, seed: int | None = None, strict: bool = False):
        self.records = records
        self.train = bool(train)
        self.image_size = int(image_size)
        self.jitter = int(jitter)
        self.seed = seed
        self.strict = bool(strict)
        self.skipped = 0  # slices replaced in this process because they could not be read
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._sample(index)
        except DataError as err:
            # Catalog checks make this rare (a file changed after indexing). Evaluation never
            # substitutes: a replaced slice would be scored under another name.
            if self.strict or not self.train:
                raise
            self.skipped += 1
            logger.warning("%s; training on a nearby slice instead (strict=False)", err)
            problem = str(err)
        for offset in range(1, min(len(self), 16)):
            try:
                return self._sample((index + offset) % len(self))
            except DataError as err:
                self.skipped += 1
                logger.warning("%s; trying the next slice (strict=False)", err)
        raise DataError(f"no readable slice near index {index}; first: {problem}")

    def set_epoch(self, epoch: int) -> None:
        """Epoch for seeded jitter; shared memory, so persistent DataLoader workers see it too."""
        self._epoch.fill_(int(epoch))

    def _jitter(self, index: int) -> np.ndarray:
        """(4,) random 0..jitter px per side. Without a seed: torch's global RNG (seeded by the run,
        distinct per DataLoader worker). With a seed: a function of (seed, epoch, index) only, so
        boxes do not depend on worker count, process count, sample order or other RNG users."""
        if self.seed is None:
            return torch.randint(0, self.jitter + 1, (4,)).numpy()
        rng = np.random.default_rng([self.seed, int(self._epoch), index])
        return rng.integers(0, self.jitter + 1, size=4)

    def _sample(self, index: int) -> dict:
        record = self.records[index]
        image = load_image(record.image_path)
        mask = load_mask(record.mask_path)
        height, width = mask.shape
        if image.shape[:2] != (height, width):
            raise DataError(f"{record.image_path}: image is {image.shape[0]}x{image.shape[1]} but its mask "
                            f"is {height}x{width}")
        if not mask.any():
            raise DataError(f"{record.mask_path}: mask is empty; the file changed after indexing "
                            "(open the catalog with refresh=True)")
        image_t = torch.from_numpy(image).permute(2, 0, 1).float()
        label_t = torch.from_numpy(mask)[None]
        size = self.image_size
        if (height, width) != (size, size):
            image_t = F.interpolate(image_t[None], size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=True)[0].clamp_(0, 255)
            # "nearest-exact" samples pixel centres (torch's "nearest" is shifted by half a pixel).
            label_t = F.interpolate(label_t[None].float(), size=(size, size), mode="nearest-exact")[0].to(torch.uint8)
        # The box is the tight box of the label the model is scored against (the resized one), so it
        # covers it exactly at any input size; a target too small to survive resizing keeps its
        # scaled original box.
        resized = label_t[0].numpy()
        if resized.any():
            box = tight_box(resized).astype(np.float32)
        else:
            box = tight_box(mask).astype(np.float32)
            box *= np.array([size / width, size / height, size / width, size / height], dtype=np.float32)
        if self.train and self.jitter > 0:
            box += self._jitter(index).astype(np.float32) * np.array([-1, -1, 1, 1], dtype=np.float32)
        box = np.clip(box, 0, size - 1)  # a scaled x_max of W-1 lands past S-1 by up to a pixel
        return {
            "image": image_t.contiguous(),
            "label": label_t.long(),
            "box": torch.from_numpy(box),
            "modal": torch.tensor(record.modal, dtype=torch.int64),
            "organ": torch.tensor(record.organ, dtype=torch.int64),
            "name": record.name,
            "index": index,
        }
