"""One case: an image and its prompts in, a label map in the image's own geometry out.

The image goes through :mod:`medsegx.data.volume`'s slice stack (the re-orientation, intensity
mapping and resampling ``prepare_data.py`` applies), the model runs on its slices
(:class:`~medsegx.inference.runner.SliceRunner`), and the masks come back through the exact inverse
(:func:`~medsegx.data.volume.mask_to_plane`, :func:`~medsegx.data.volume.stack_to_image`). The prompts
are checked once, before any work, by :func:`check_prompts` (``predict.py``'s plan, the Segmenter's entry
points, ``medsegx serve``'s request parsing).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..data.errors import ConversionError, DataError
from ..data.grid import SLICE_SIZE
from ..data.intensity import to_display
from ..data.presets import AXES, DEFAULT_AXIS, DEFAULT_ORIENT, DEFAULT_PERCENTILES
from ..data.sources import IMAGE2D_EXTENSIONS, VOLUME_EXTENSIONS, read_image
from ..data.volume import SliceStack, mask_to_plane, put_plane, slice_stack, stack_intensity, stack_to_image
from ..fileio import atomic_write_named, atomic_write_text, format_json
from ..reports import plot_label_overlay
from .prompts import (
    NPY_EXTENSION,
    PROPAGATE_GROW,
    ObjectPrompt,
    PreparedObject,
    PromptError,
    TaskContext,
    box_mask,
    check_box_inside,
    mask_objects,
    resolve_context,
    slice_boxes,
)

if TYPE_CHECKING:  # types only: the runner (torch) does not import this module, nor this module it
    from .runner import SliceOutput, SliceRunner

logger = logging.getLogger(__name__)

# the choice among the model's outputs (SAM: three; lite: one): never the label (no "oracle" here)
# 2-D formats without a physical pixel size: distances are reported in pixels
PIXEL_ONLY_EXTENSIONS = (*IMAGE2D_EXTENSIONS, NPY_EXTENSION)
# every single-file input a case can be (DICOM series are folders)
CASE_EXTENSIONS = (*VOLUME_EXTENSIONS, *IMAGE2D_EXTENSIONS, NPY_EXTENSION)


@dataclass
class PredictOptions:
    """How every case of a run is prepared and prompted (the flags of ``predict.py``)."""

    modality: str
    task: str | None = None
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    axis: str = DEFAULT_AXIS
    orient: str = DEFAULT_ORIENT
    propagate: bool = False
    box_margin: int = 0
    propagate_grow: int = PROPAGATE_GROW
    labels_map: Mapping[str, tuple[int, ...]] | None = None  # prompt-mask values -> task


def read_case_image(path: str | Path) -> sitk.Image:
    """An input as a SimpleITK image: a volume file, a DICOM series folder, a 2-D image, or a
    MedSegDB ``.npy`` slice ((H, W[, 3]) uint8, read without unpickling)."""
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(NPY_EXTENSION):
        from ..data.dataset import load_image

        try:
            array = load_image(path)
        except DataError as err:
            raise ConversionError(str(err)) from None
        return sitk.GetImageFromArray(array, isVector=True)
    return read_image(path)


def output_suffix(kind: str) -> str:
    """``.png`` for 2-D inputs, ``.nii.gz`` for volumes (NIfTI, NRRD, MHA, DICOM)."""
    return ".png" if kind == "image2d" else ".nii.gz"


@dataclass
class CaseJob:
    """One case to predict, its prompts checked (:func:`check_prompts`), and the files it writes."""

    case: str
    image: Path
    output: Path | None = None                 # the label map
    objects: list[ObjectPrompt] | None = None  # boxes; None: from the prompt mask
    prompt_mask: Path | None = None
    reference: Path | None = None              # scored against when given
    log: Path | None = None                    # the JSON record
    overlay: Path | None = None                # the overlay PNG


def check_prompts(prompts: Sequence[ObjectPrompt] | None, size: Sequence[int], propagate: bool, where: str) -> None:
    """Every box inside the image (``size`` in ITK order), and propagation only from boxes; :class:`PromptError`."""
    for prompt in prompts or ():
        if prompt.box is not None:
            check_box_inside(prompt.box, size, where)
    if propagate and (prompts is None or any(p.box is None for p in prompts)):
        raise PromptError(f"{where}: --propagate starts from a box; it does not apply to a prompt mask")


# --------------------------------------------------------------------------- predicting one case


@dataclass
class CasePrediction:
    """The outcome of one case: the label map (input geometry) and what was done to get it."""

    case: str
    image: sitk.Image                          # uint8 label map, the input's size/spacing/origin/direction
    stack: SliceStack
    labels: np.ndarray                         # the same labels in the stack's canonical order
    objects: list[PreparedObject]
    results: list[dict[int, SliceOutput]]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def array(self) -> np.ndarray:
        """The label map as a numpy array in the input's stored order ((z,) y, x)."""
        return sitk.GetArrayFromImage(self.image)

    def log(self) -> dict:
        """The per-slice record written as ``<case>.json``."""
        record = self.stack.record
        axis_name, to_stored = stored_slice_index(record)
        objects = []
        for obj, per_slice in zip(self.objects, self.results):
            slices = []
            for k in sorted(per_slice):
                entry = per_slice[k].as_dict()
                if axis_name is not None:
                    entry[f"{axis_name}_index"] = to_stored(k)
                slices.append(entry)
            objects.append({
                "label": obj.label, "task": obj.context.task, "prompt": obj.prompt.describe(),
                "context": obj.context.as_dict(), "intensity": obj.bounds, "slices_prompted": len(obj.boxes),
                "slices_predicted": len(per_slice), "slices": slices,
            })
        return {
            "case": self.case, "kind": record["kind"], "size": record["size"], "spacing": record["spacing"],
            "orientation": record["orientation"], "slicing": record["axis"], "seconds": round(self.seconds, 2),
            "notes": self.notes, "objects": objects,
        }


def stored_slice_index(record: Mapping):
    """The stored image axis a canonical slice id runs along (``"x"|"y"|"z"``) and the id -> stored index map."""
    if record["kind"] == "image2d":
        return None, None
    canonical_axis = 2 - AXES.index(record["axis"])  # ITK order x, y, z
    stored_axis = record["perm"][canonical_axis]
    n = record["size"][stored_axis]
    flipped = record["flip"][canonical_axis]
    return "xyz"[stored_axis], (lambda k: n - 1 - k if flipped else k)


def prepare_objects(stack: SliceStack, image_size: Sequence[int], prompts: Sequence[ObjectPrompt] | None,
                    prompt_mask: np.ndarray | None, opts: PredictOptions, case: str,
                    intensity_cache: dict | None = None) -> tuple[list[PreparedObject], list[str]]:
    """Context, intensity mapping and per-slice boxes of every object; notes for empty prompts.

    ``intensity_cache``: a dict kept per image across calls (the server) so percentile bounds are computed once.
    """
    where = f"case {case!r}"
    notes: list[str] = []
    if prompts is None:
        if prompt_mask is None:
            raise PromptError(f"{where}: no prompt (give a box, a prompts file or a prompt mask)")
        prompts = mask_objects(np.unique(prompt_mask).tolist(), opts.labels_map, f"{where}")
    stored_shape = tuple(reversed([int(n) for n in image_size]))
    contexts: dict[str | None, TaskContext] = {}
    intensity_cache = {} if intensity_cache is None else intensity_cache
    prepared = []
    for prompt in prompts:
        task = prompt.task or opts.task
        if task not in contexts:
            contexts[task] = resolve_context(opts.modality, task)
        context = contexts[task]
        bounds = stack_intensity(stack, context.modality, context.task or "", opts.window, opts.percentiles,
                                 intensity_cache)
        if prompt.box is not None:
            canonical = stack.to_canonical(box_mask(prompt.box, stored_shape))
        else:
            canonical = stack.to_canonical(np.isin(prompt_mask, prompt.mask_values))
        boxes = slice_boxes(stack, canonical, opts.box_margin)
        if not boxes:
            notes.append(f"{prompt.describe()}: no voxel in the prompt mask, nothing predicted for label {prompt.label}")
        prepared.append(PreparedObject(prompt, context, bounds, boxes, seed_slice(stack, prompt, boxes, opts, where)))
    if prompt_mask is not None and not any(o.boxes for o in prepared):
        notes.append("the prompt mask is empty" + (" for the values of --labels_map" if opts.labels_map else "")
                     + ": wrote an empty mask")
    return prepared, notes


def seed_slice(stack: SliceStack, prompt: ObjectPrompt, boxes: Mapping[int, np.ndarray], opts: PredictOptions,
               where: str) -> int | None:
    """The slice id of ``prompt.seed`` (a stored index along the slicing axis), checked: it needs a
    volume box, propagation, and a slice inside the box's range."""
    if prompt.seed is None:
        return None
    axis_name, to_stored = stored_slice_index(stack.record)
    if axis_name is None or prompt.box is None or len(prompt.box) != 6:
        raise PromptError(f"{where}: {prompt.describe()}: a seed slice goes with a volume box (x0 y0 z0 x1 y1 z1)")
    if not opts.propagate:
        raise PromptError(f"{where}: {prompt.describe()}: a seed slice is where propagation starts; add --propagate")
    k = to_stored(prompt.seed)  # the map between stored index and slice id is its own inverse
    if k not in boxes:
        lo, hi = sorted(to_stored(j) for j in (min(boxes), max(boxes)))
        raise PromptError(f"{where}: {prompt.describe()}: seed slice {prompt.seed} is outside the box's "
                          f"{axis_name} range {lo}..{hi}")
    return k


def predict_case(runner: SliceRunner, case: str, image: sitk.Image, source: str | Path,
                 prompts: Sequence[ObjectPrompt] | None, opts: PredictOptions,
                 prompt_mask: np.ndarray | None = None, progress: bool = True, *, stack: SliceStack | None = None,
                 intensity_cache: dict | None = None) -> CasePrediction:
    """Segment one image: ``prompts`` (boxes, checked by :func:`check_prompts`) or ``prompt_mask``
    (stored order, integer values).

    ``stack`` (``slice_stack(image, source, opts.axis, opts.orient)``) and ``intensity_cache`` may be
    kept by a caller that segments the same image many times (``medsegx serve``).
    """
    t0 = time.perf_counter()
    if stack is None:
        stack = slice_stack(image, source, opts.axis, opts.orient)
    objects, notes = prepare_objects(stack, image.GetSize(), prompts, prompt_mask, opts, case, intensity_cache)
    for note in notes:
        logger.warning("%s: %s", case, note)
    results = runner.segment(stack, objects, propagate=opts.propagate, margin=opts.box_margin,
                             grow=opts.propagate_grow, desc=case,
                             progress=progress)
    labels = compose_labels(stack, objects, results)
    out = stack_to_image(labels, stack.record)
    return CasePrediction(case, out, stack, labels, objects, results, notes, time.perf_counter() - t0)


def compose_labels(stack: SliceStack, objects: Sequence[PreparedObject],
                   results: Sequence[dict[int, SliceOutput]]) -> np.ndarray:
    """Label volume in the stack's canonical order: each object's predicted slices, written back
    through :func:`~medsegx.data.volume.mask_to_plane`, as its label value (later objects win
    where objects overlap)."""
    record = stack.record
    shape = tuple(record["canonical_shape"])
    labels = np.zeros(shape, dtype=np.uint8)
    for obj, per_slice in zip(objects, results):
        mask = np.zeros(shape, dtype=bool)
        for k, out in per_slice.items():
            put_plane(mask, record, k, mask_to_plane(out.mask, record))
        labels[mask] = obj.label
    return labels


# --------------------------------------------------------------------------- writing


def write_image_atomic(image: sitk.Image, path: str | Path) -> None:
    """Write through a temporary file beside ``path`` (same extension) and rename it: never a half-written output."""
    atomic_write_named(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def write_json_atomic(data: Mapping, path: str | Path) -> None:
    atomic_write_text(path, format_json(data) + "\n", like_open=True)


def write_overlay(prediction: CasePrediction, path: str | Path, n_slices: int = 4) -> None:
    """A PNG of up to ``n_slices`` slices (spread over the predicted extent) with the label map over
    the image as the model saw it (intensity mapping of the first object), and the boxes used."""
    stack, labels = prediction.stack, prediction.labels
    record = stack.record
    axis = stack.axis_index
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(labels.any(axis=others))
    if present.size:
        picks = sorted({int(present[round(q * (present.size - 1))]) for q in np.linspace(0.15, 0.85, n_slices)})
    else:
        picks = [stack.n_slices // 2]
    bounds = prediction.objects[0].bounds if prediction.objects else {"mode": "none"}
    rows_mm, cols_mm = record["slice_spacing"]
    height, width = record["slice_shape"]
    sx, sy = width / SLICE_SIZE, height / SLICE_SIZE
    panels = []
    for k in picks:
        plane = stack.plane(k)
        shown = plane.astype(np.float32) / 255.0 if bounds["mode"] == "none" else to_display(plane, bounds) / 255.0
        boxes = []
        for obj, per_slice in zip(prediction.objects, prediction.results):
            if k in per_slice:
                x0, y0, x1, y1 = per_slice[k].box
                boxes.append((obj.label, x0 * sx - 0.5, y0 * sy - 0.5, (x1 - x0 + 1) * sx, (y1 - y0 + 1) * sy))
        panels.append({"title": f"{prediction.case}  slice {k}", "image": shown, "labels": stack.plane(k, labels),
                       "boxes": boxes})
    legend = [(obj.label, f"{obj.label}: {obj.context.task or 'unknown task'}") for obj in prediction.objects]
    plot_label_overlay(panels, legend, rows_mm / cols_mm, path)
