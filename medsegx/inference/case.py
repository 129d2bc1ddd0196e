"""One case: an image and its prompts in, a label map in the image's own geometry out.

The image goes through :mod:`medsegx.data.volume`'s slice stack (the re-orientation, intensity
mapping and resampling ``prepare_data.py`` applies), the model runs on its slices
(:class:`~medsegx.inference.runner.SliceRunner`), and the masks come back through the exact inverse
(:func:`~medsegx.data.volume.mask_to_plane`, :func:`~medsegx.data.volume.stack_to_image`). Labels are
read only by :func:`score_reference`, after the prediction.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..data.errors import ConversionError, DataError
from ..data.intensity import to_display
from ..data.presets import DEFAULT_PERCENTILES
from ..data.sources import IMAGE2D_EXTENSIONS, VOLUME_EXTENSIONS, read_image
from ..data.volume import SliceStack, slice_stack, stack_intensity, stack_to_image
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

if TYPE_CHECKING:
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
    axis: str = "axial"
    orient: str = "LPS"
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
    canonical_axis = 2 - ("axial", "coronal", "sagittal").index(record["axis"])  # ITK order x, y, z
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
            check_box_inside(prompt.box, image_size, where)
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
    """Segment one image: ``prompts`` (boxes) or ``prompt_mask`` (stored order, integer values).

    ``stack`` (``slice_stack(image, source, opts.axis, opts.orient)``) and ``intensity_cache`` may be
    kept by a caller that segments the same image many times (``medsegx serve``).
    """
    from .runner import compose_labels

    t0 = time.perf_counter()
    if stack is None:
        stack = slice_stack(image, source, opts.axis, opts.orient)
    objects, notes = prepare_objects(stack, image.GetSize(), prompts, prompt_mask, opts, case, intensity_cache)
    for note in notes:
        logger.warning("%s: %s", case, note)
    if opts.propagate and any(o.prompt.box is None for o in objects):
        raise PromptError(f"case {case!r}: --propagate starts from a box; it does not apply to a prompt mask")
    results = runner.segment(stack, objects, propagate=opts.propagate, margin=opts.box_margin,
                             grow=opts.propagate_grow, desc=case,
                             progress=progress)
    labels = compose_labels(stack, objects, results)
    out = stack_to_image(labels, stack.record)
    return CasePrediction(case, out, stack, labels, objects, results, notes, time.perf_counter() - t0)


# --------------------------------------------------------------------------- scoring against a reference


def score_reference(prediction: CasePrediction, reference: np.ndarray, physical: bool,
                    nsd_tolerance: float = 2.0) -> list[dict]:
    """3-D (volume) or 2-D DSC, HD95 and NSD of each object against ``reference`` (stored order).

    Computed on the whole volume: false positives on slices without reference foreground count.
    Distances are in millimetres when ``physical`` (the image's spacing), else in pixels. An object
    whose values are absent from the reference is reported, not scored.
    """
    from ..metrics import dice, hd95, nsd

    predicted = prediction.array
    spacing = list(reversed(prediction.image.GetSpacing())) if physical else [1.0] * predicted.ndim
    unit = "mm" if physical else "px"
    dims = predicted.ndim
    rows = []
    for obj in prediction.objects:
        pred = (predicted == obj.label)[None]
        ref = np.isin(reference, obj.prompt.reference_values)[None]
        row: dict = {"label": obj.label, "task": obj.context.task,
                     "reference_values": list(obj.prompt.reference_values), "unit": unit,
                     "pred_voxels": int(pred.sum()), "ref_voxels": int(ref.sum())}
        if not ref.any():
            row.update(dsc=None, hd95=None, nsd=None, note="the reference has no voxel of these values")
        else:
            row["dsc"] = float(dice(pred, ref, spatial_dims=dims)[0])
            value = float(hd95(pred, ref, spacing=spacing, empty="nan", spatial_dims=dims)[0])
            row["hd95"] = None if math.isnan(value) else value
            row["nsd"] = float(nsd(pred, ref, nsd_tolerance, spacing=spacing, empty="monai", spatial_dims=dims)[0])
            row["nsd_tolerance"] = nsd_tolerance
            if not pred.any():
                row["note"] = "empty prediction (HD95 undefined)"
        rows.append(row)
    return rows


def describe_scores(case: str, rows: Sequence[dict]) -> list[str]:
    lines = []
    for r in rows:
        name = f"{case} label {r['label']}" + (f" ({r['task']})" if r["task"] else "")
        if r["dsc"] is None:
            lines.append(f"{name}: {r['note']}")
            continue
        hd = "n/a" if r["hd95"] is None else f"{r['hd95']:.2f} {r['unit']}"
        lines.append(f"{name}: DSC {r['dsc']:.4f}, HD95 {hd}, NSD@{r['nsd_tolerance']:g}{r['unit']} {r['nsd']:.4f}")
    return lines


# --------------------------------------------------------------------------- writing


def _temp_beside(path: Path, suffix: str) -> Path:
    """An empty temporary file in ``path``'s folder, with the permissions a new file gets (umask)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def write_image_atomic(image: sitk.Image, path: str | Path) -> None:
    """Write through a temporary file beside ``path`` and rename it: never a half-written output."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = _temp_beside(path, suffix)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = _temp_beside(path, path.suffix)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_json(value: object, indent: int = 0, width: int = 170) -> str:
    """JSON with one line per short item (a slice's record), nested blocks otherwise."""
    flat = json.dumps(value, allow_nan=False)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {format_json(v, indent + 1, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + format_json(v, indent + 1, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def write_json_atomic(data: Mapping, path: str | Path) -> None:
    write_text_atomic(format_json(data) + "\n", path)


def write_overlay(prediction: CasePrediction, path: str | Path, n_slices: int = 4) -> None:
    """A PNG of up to ``n_slices`` slices (spread over the predicted extent) with the label map over
    the image as the model saw it (intensity mapping of the first object), and the boxes used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

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
    colours = plt.get_cmap("tab10")
    aspect = rows_mm / cols_mm
    panel_height = 3.6 * min(max(height * aspect / width, 0.3), 2.5)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), panel_height + 0.9), squeeze=False)
    for ax, k in zip(axes[0], picks):
        plane = stack.plane(k)
        if bounds["mode"] == "none":
            shown = plane.astype(np.float32) / 255.0
        else:
            shown = to_display(plane, bounds) / 255.0
        ax.imshow(np.clip(shown, 0, 1), cmap="gray", aspect=aspect, interpolation="nearest")
        label_plane = stack.plane(k, labels)
        overlay = np.zeros((*label_plane.shape, 4))
        for value in np.unique(label_plane[label_plane > 0]):
            overlay[label_plane == value] = (*colours(int(value) % 10)[:3], 0.45)
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        for obj, per_slice in zip(prediction.objects, prediction.results):
            if k in per_slice:
                x0, y0, x1, y1 = per_slice[k].box
                sx, sy = width / 256.0, height / 256.0
                ax.add_patch(Rectangle((x0 * sx - 0.5, y0 * sy - 0.5), (x1 - x0 + 1) * sx, (y1 - y0 + 1) * sy,
                                       fill=False, lw=1.0, ec=colours(obj.label % 10)))
        ax.set_title(f"{prediction.case}  slice {k}", fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=colours(obj.label % 10), label=f"{obj.label}: {obj.context.task or 'unknown task'}")
               for obj in prediction.objects]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    path = Path(path)
    tmp = _temp_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
