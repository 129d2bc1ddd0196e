"""Slices through the model: batched forwards, a label-free choice among the outputs, and
propagation of a 3-D box from the middle slice outwards.

One forward per (slice, object), exactly as the evaluation runs the model (``model(image, box,
modal, organ)``); the context enters the image encoder, so objects of different tasks on the
same slice are separate forwards. With LiteMedSAM the frozen layers before the first adapter
depend on the image only: they are computed once per slice and kept for the case (the model's own
exact prefix cache).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import runtime
from ..data.grid import SLICE_SIZE
from ..data.volume import SliceStack, model_slice
from ..metrics.select import binarize, select_masks
from ..model.config import DEFAULT_MODEL_TYPE, default_select
from ..selection import LABEL_FREE_MODES
from .prompts import PROPAGATE_GROW, PreparedObject, follow_box

logger = logging.getLogger(__name__)

# Prefix-cache entries kept per case (LiteMedSAM: 5.2 MB each in float32); later slices are recomputed.
PREFIX_CACHE_SLICES = 128


def retain_freed_memory() -> bool:
    """Keep memory that torch frees inside the process instead of handing it back to the OS (glibc).

    A LiteMedSAM forward allocates and frees large activation buffers (16-128 MB each); glibc
    returns such blocks to the OS (mmap / heap trim) and the next forward page-faults them in
    again, ~3 s of system time per slice at batch 4 on the 2-core test machine, half of the wall
    time (docs/PERFORMANCE.md). Raising glibc's mmap and trim thresholds keeps them. The process
    then stays at its peak memory until it exits: right for the predict command, which calls this;
    a library import does not. ``MEDSEGX_MALLOC_TUNING=0`` turns it off. Returns whether it applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MEDSEGX_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's mallopt parameter numbers
    settings = ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 31), (m_top_pad, 1 << 28))
    return all(mallopt(param, value) == 1 for param, value in settings)


@dataclass
class SliceOutput:
    """The model's answer for one object on one slice (256 grid)."""

    k: int
    box: np.ndarray        # (4,) x0, y0, x1, y1 on the 256 grid, as given to the model
    mask: np.ndarray       # (256, 256) bool, the chosen output after sigmoid > 0.5
    chosen: int            # which of the outputs
    iou_pred: list[float]  # the model's IoU prediction for each output
    seconds: float         # this slice's share of its batch's forward time

    def as_dict(self) -> dict:
        return {"slice": self.k, "box_256": [int(v) for v in self.box], "output": self.chosen,
                "iou_pred": [round(v, 4) for v in self.iou_pred], "pixels_256": int(self.mask.sum()),
                "seconds": round(self.seconds, 3)}


@dataclass
class _Request:
    obj: int
    k: int
    box: np.ndarray


class SliceRunner:
    """Runs requests in batches of ``batch_size`` on ``device`` and picks one output by ``select``
    (None: the default of the model's backbone, :func:`~medsegx.model.config.default_select`)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", *, batch_size: int = 8,
                 amp: bool = False, amp_dtype: str | None = None, select: str | None = None) -> None:
        if select is None:
            config = getattr(model, "config", None)
            select = default_select(config.model_type if config is not None else DEFAULT_MODEL_TYPE)
        if select not in LABEL_FREE_MODES:
            raise ValueError(f"select must be one of {LABEL_FREE_MODES} (never the label), got {select!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.amp_dtype, self.select = amp_dtype, select
        self.prefix_cache = bool(getattr(model, "supports_prefix_cache", False))
        # The backend: a torch model, or anything called the same way (model(image, box, modal, organ) ->
        # MedSegXOutput), such as the onnxruntime model of medsegx.model.onnx_runtime.
        self.backend = getattr(model, "backend", "torch")
        if amp and self.backend != "torch":
            logger.warning("--use_amp does not apply to the %s backend (its graphs are float32): ignored", self.backend)
            self.amp = False
        else:
            self.amp = runtime.amp_allowed(self.device, amp)  # a CPU without native bf16 stays float32

    @torch.inference_mode()
    def forward(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], modal: Sequence[int],
                organ: Sequence[Sequence[int]], keys: Sequence[str] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One batch: images (256, 256, 3) uint8, boxes on the 256 grid, context rows.

        Returns the chosen masks ``B x 256 x 256`` bool, the chosen output indices ``B`` and the
        IoU predictions ``B x K``.
        """
        image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(self.device)
        box = torch.from_numpy(np.stack(boxes).astype(np.float32)).to(self.device)
        modal_t = torch.tensor(list(modal), dtype=torch.int64, device=self.device)
        organ_t = torch.tensor([list(o) for o in organ], dtype=torch.int64, device=self.device)
        kwargs = {"cache_keys": list(keys)} if self.prefix_cache and keys is not None else {}
        with runtime.autocast(self.device, self.amp, self.amp_dtype):
            out = self.model(image, box, modal_t, organ_t, **kwargs)
        logits = out.masks.float()
        masks = binarize(logits)  # sigmoid > 0.5, as the evaluation
        iou = out.iou_pred.float().cpu().numpy()
        chosen = select_masks(logits, iou_pred=iou, mode=self.select)  # the logits: some rules threshold them
        return masks[np.arange(len(chosen)), chosen], chosen, iou

    # ------------------------------------------------------------------ one case
    def segment(self, stack: SliceStack, objects: Sequence[PreparedObject], *, propagate: bool = False,
                margin: int = 0, grow: int = PROPAGATE_GROW, desc: str | None = None,
                progress: bool = True) -> list[dict[int, SliceOutput]]:
        """Every object's slices of one case -> per object, slice id -> :class:`SliceOutput`.

        Without ``propagate`` each slice with a box is one request, all batched. With it, each
        object starts on the middle slice of its boxes (or on its seed slice, ``PreparedObject.start``)
        with the user's box there and proceeds outwards one slice at a time in both directions, each
        slice's box the tight box of its neighbour's predicted mask grown by ``margin + grow`` pixels
        and kept inside the user's box on that slice (a seeded box bounds its seed slice only), until
        the mask vanishes or the box's slice range ends.
        """
        images: dict[tuple, np.ndarray] = {}

        def image_of(obj: PreparedObject, k: int) -> tuple[str, np.ndarray]:
            b = obj.bounds
            key = (b.get("mode"), b.get("lo"), b.get("hi"), k)
            if key not in images:
                images[key] = model_slice(stack, k, b)
            return "|".join(map(str, key)), images[key]

        results: list[dict[int, SliceOutput]] = [{} for _ in objects]
        bar = tqdm(total=sum(len(o.boxes) for o in objects), desc=desc, unit="slice", disable=not progress,
                   dynamic_ncols=True)

        def run(requests: list[_Request]) -> None:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start:start + self.batch_size]
                keyed = [image_of(objects[r.obj], r.k) for r in chunk]
                t0 = time.perf_counter()
                masks, chosen, iou = self.forward(
                    [img for _, img in keyed], [r.box for r in chunk], [objects[r.obj].context.modal for r in chunk],
                    [objects[r.obj].context.organ for r in chunk], [key for key, _ in keyed])
                share = (time.perf_counter() - t0) / len(chunk)
                for j, r in enumerate(chunk):
                    results[r.obj][r.k] = SliceOutput(r.k, r.box, masks[j], int(chosen[j]), iou[j].tolist(), share)
                bar.update(len(chunk))

        if self.prefix_cache:
            self.model.enable_prefix_cache(max_items=PREFIX_CACHE_SLICES)
        try:
            if not propagate:
                run([_Request(i, k, box) for i, o in enumerate(objects) for k, box in sorted(o.boxes.items())])
            else:
                self._propagate(objects, results, run, margin, grow)
                bar.total = bar.n
                bar.refresh()
        finally:
            if self.prefix_cache:
                self.model.disable_prefix_cache()
            bar.close()
        return results

    @staticmethod
    def _propagate(objects: Sequence[PreparedObject], results: list[dict[int, SliceOutput]], run, margin: int,
                   grow: int) -> None:
        start = []
        fronts: list[tuple[int, int, int, int]] = []  # object, step (+1/-1), last slice done, limit
        whole = np.array([0, 0, SLICE_SIZE - 1, SLICE_SIZE - 1], dtype=np.float32)
        for i, o in enumerate(objects):
            if not o.boxes:
                continue
            ks = sorted(o.boxes)
            first = ks[(len(ks) - 1) // 2] if o.start is None else o.start
            start.append(_Request(i, first, o.boxes[first]))
            fronts += [(i, +1, first, ks[-1]), (i, -1, first, ks[0])]
        run(start)
        while True:
            requests, next_fronts = [], []
            for i, step, done, limit in fronts:
                previous = results[i][done].mask
                k = done + step
                if not previous.any() or (k - limit) * step > 0:
                    continue  # the object ended on the previous slice, or the box's range did
                # a 3-D bounding box holds every slice; a box drawn on the seed slice only that one
                bound = objects[i].boxes[k] if objects[i].start is None else whole
                requests.append(_Request(i, k, follow_box(previous, bound, margin, grow)))
                next_fronts.append((i, step, k, limit))
            if not requests:
                return
            run(requests)
            fronts = next_fronts
