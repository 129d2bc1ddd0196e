"""Prompts for prediction: what the user gives (boxes, a prompts file, a rough mask) -> per-slice boxes.

Every prompt becomes a mask in the image's stored voxel order first (a box is a cuboid of voxels),
then goes through the same re-ordering and slicing as the image (:class:`~medsegx.data.volume.SliceStack`),
and each slice's box is derived from it as the evaluation derives boxes from labels: the tight box of
the mask resampled to the 256 grid (nearest neighbour, as ``prepare_data.py`` resamples labels).
So a box drawn in ITK-SNAP / 3D Slicer coordinates lands on exactly the pixels it covers, whatever
the volume's orientation.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..args import PROPAGATE_GROW
from ..data.grid import SLICE_SIZE
from ..data.intensity import resize_mask
from ..data.sources import IMAGE_SUFFIXES, strip_extension
from ..data.taxonomy import NEUTRAL_ROW, TaxonomyError, load_taxonomy
from ..data.volume import SliceStack
from ..errors import UserError

logger = logging.getLogger(__name__)

MAX_LABEL = 255  # outputs are uint8 label maps
NPY_EXTENSION = ".npy"
_OBJECT_KEYS = {"box", "label", "task", "seed"}


class PromptError(UserError, ValueError):
    """A prompt that cannot be used; the message names the case, the prompt and what is wrong."""


def case_name(path: str | Path) -> str:
    """A case's name: the file name without its image extension (and nnU-Net's ``_0000``), or the
    DICOM folder's name. Keys of a prompts file are read the same way."""
    path = Path(path)
    name = path.name[: -len(NPY_EXTENSION)] if path.name.lower().endswith(NPY_EXTENSION) else strip_extension(path.name)
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class TaskContext:
    """The model's context for one object: modality and task names and their embedding rows."""

    modality: str                     # canonical modality name (taxonomy), e.g. "CT"
    task: str | None                  # task name as the taxonomy spells it, or as given when unknown
    modal: int
    organ: tuple[int, int, int, int]  # body part, subregion, organ, task rows
    known_task: bool

    def as_dict(self) -> dict:
        return {"modality": self.modality, "task": self.task, "modal": self.modal, "organ": list(self.organ),
                "known_task": self.known_task}


def resolve_context(modality: str, task: str | None) -> TaskContext:
    """Context rows of ``modality`` (a taxonomy name or alias) and ``task`` (looked up as a task folder
    is: official names, then case and separators ignored, then synonyms such as TotalSegmentator's).

    An unknown modality raises :class:`~medsegx.data.taxonomy.TaxonomyError` listing the known ones; an
    unknown task (or none) gets the neutral context and the spare unknown-task row, with a warning.
    """
    tax = load_taxonomy()
    canonical = tax.canonical_modality(modality)
    if task is None:
        logger.warning("no task given: using the neutral context and the unknown-task row %d", tax.unknown_task)
        return TaskContext(canonical, None, tax.modality_index(canonical),
                           (NEUTRAL_ROW, NEUTRAL_ROW, NEUTRAL_ROW, tax.unknown_task), False)
    if not task.strip() or "/" in task:
        raise TaxonomyError(f"invalid task name {task!r}: give a taxonomy task such as Liver or LeftKidney")
    ctx = tax.context(f"{canonical}_{task}")
    return TaskContext(canonical, ctx.target, ctx.modal, ctx.organ_indices, ctx.known_task)


# --------------------------------------------------------------------------- what the user asked for


@dataclass
class ObjectPrompt:
    """One object to segment in one case.

    ``box``: 4 (2-D: x0 y0 x1 y1) or 6 (volume: x0 y0 z0 x1 y1 z1) inclusive voxel indices of the
    stored array (x = column, y = row, z = slice). ``mask_values``: the values of the prompt mask
    that form the object (instead of a box). ``label``: value written in the output. ``seed``: with a
    volume box and propagation, the stored index of the slice the box's x-y extent was drawn on (a
    viewer's box on one slice, its z range the object's first and last slice): propagation starts there
    and only that slice is held to the box; without it the box is the object's 3-D bounding box and
    propagation starts on its middle slice.
    """

    label: int = 1
    task: str | None = None
    box: tuple[int, ...] | None = None
    mask_values: tuple[int, ...] | None = None
    seed: int | None = None

    @property
    def source(self) -> str:
        return "box" if self.box is not None else "prompt_mask"

    @property
    def reference_values(self) -> tuple[int, ...]:
        """Values of a reference label map that this object is scored against."""
        return self.mask_values or (self.label,)

    def describe(self) -> str:
        if self.box is not None:
            return f"box {' '.join(map(str, self.box))}" + (f" drawn on slice {self.seed}" if self.seed is not None else "")
        return f"prompt mask value(s) {'+'.join(map(str, self.mask_values or ()))}"


def check_label(label: object, where: str) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= MAX_LABEL:
        raise PromptError(f"{where}: label {label!r} must be an integer 1..{MAX_LABEL} (outputs are uint8)")
    return label


def parse_box(values: Sequence[object], where: str) -> tuple[int, ...]:
    """4 or 6 integers, each ``min <= max``; raises :class:`PromptError` naming ``where``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) not in (4, 6):
        raise PromptError(f"{where}: a box is 4 numbers x0 y0 x1 y1 (2-D) or 6 numbers x0 y0 z0 x1 y1 z1 "
                          f"(volume), got {values!r}")
    box = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise PromptError(f"{where}: box {list(values)} holds {v!r}; boxes are integer voxel indices")
        box.append(int(v))
    half = len(box) // 2
    for axis, (lo, hi) in zip("xyz", zip(box[:half], box[half:])):
        if lo > hi:
            raise PromptError(f"{where}: box {box} has {axis}0 = {lo} > {axis}1 = {hi}")
    return tuple(box)


def check_box_inside(box: tuple[int, ...], size: Sequence[int], where: str) -> None:
    """The box must fit the image (``size`` in ITK order x, y[, z]) and match its dimension."""
    dim = len(size)
    if len(box) != 2 * dim:
        kind = "a volume: give a 3-D box x0 y0 z0 x1 y1 z1" if dim == 3 else "2-D: give a box x0 y0 x1 y1"
        raise PromptError(f"{where}: box {list(box)} has {len(box)} numbers but the image is {kind}")
    lo, hi = box[:dim], box[dim:]
    if any(v < 0 for v in lo) or any(h >= n for h, n in zip(hi, size)):
        raise PromptError(f"{where}: box {list(box)} lies outside the image of size {' x '.join(map(str, size))} "
                          f"(valid indices 0..{', 0..'.join(str(n - 1) for n in size)})")


def load_prompts_file(path: str | Path) -> dict[str, list[ObjectPrompt]]:
    """``{"case": [{"box": [...], "label": 2, "task": "Spleen"}, ...]}`` -> objects per case name.

    Case keys may be case names or file names (``ct.nii.gz`` = ``ct``). Raises
    :class:`PromptError` naming the file, case and object for anything malformed.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"{path}: prompts file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptError(f"{path}: cannot read the prompts file ({err})") from err
    if not isinstance(raw, Mapping) or not raw:
        raise PromptError(f'{path}: expected {{"case": [{{"box": [...], "label": 1, "task": "..."}}, ...]}}')
    out: dict[str, list[ObjectPrompt]] = {}
    for key, objects in raw.items():
        case = case_name(str(key))
        if case in out:
            raise PromptError(f"{path}: case {case!r} is given twice")
        if isinstance(objects, Mapping):
            objects = [objects]
        if not isinstance(objects, list) or not objects:
            raise PromptError(f"{path}: case {key!r} needs a list of objects, got {objects!r}")
        parsed = []
        for i, obj in enumerate(objects):
            where = f"{path}: case {key!r}, object {i}"
            if not isinstance(obj, Mapping) or "box" not in obj:
                raise PromptError(f"{where}: an object is {{\"box\": [...], \"label\": 1, \"task\": \"...\"}}")
            unknown = sorted(set(obj) - _OBJECT_KEYS)
            if unknown:
                raise PromptError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_OBJECT_KEYS)}")
            task = obj.get("task")
            if task is not None and not isinstance(task, str):
                raise PromptError(f"{where}: task must be a string, got {task!r}")
            seed = obj.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise PromptError(f"{where}: seed must be a slice index (an integer), got {seed!r}")
            parsed.append(ObjectPrompt(label=check_label(obj.get("label", 1), where), task=task,
                                       box=parse_box(obj["box"], where), seed=seed))
        out[case] = parsed
    return out


def mask_objects(values_present: Sequence[int], labels_map: Mapping[str, tuple[int, ...]] | None,
                 where: str) -> list[ObjectPrompt]:
    """Objects of a prompt mask: one per value present (task from the run), or one per entry of
    ``labels_map`` (``{task: values}``; merged values form one object written as the first value).
    """
    if labels_map is None:
        objects = [ObjectPrompt(label=int(v), mask_values=(int(v),)) for v in values_present if v != 0]
    else:
        objects = [ObjectPrompt(label=int(values[0]), task=task, mask_values=tuple(int(v) for v in values))
                   for task, values in labels_map.items()]
    for obj in objects:
        check_label(obj.label, f"{where}: prompt mask value {obj.label}")
    return objects


# --------------------------------------------------------------------------- per-slice boxes


def box_mask(box: tuple[int, ...], shape: Sequence[int]) -> np.ndarray:
    """The voxels a box covers, as a bool array of the image's stored numpy ``shape`` ((z,) y, x)."""
    dim = len(box) // 2
    lo, hi = box[:dim], box[dim:]
    mask = np.zeros(tuple(shape), dtype=bool)
    # box order is x, y[, z]; numpy order is [z,] y, x
    mask[tuple(slice(lo[a], hi[a] + 1) for a in reversed(range(dim)))] = True
    return mask


def plane_box(plane: np.ndarray, margin: int = 0, size: int = SLICE_SIZE) -> np.ndarray:
    """Box prompt on the ``size`` grid for the foreground of one slice ``plane`` (its own resolution).

    As the evaluation: the tight box (x0, y0, x1, y1, inclusive) of the mask resampled to the grid by
    nearest neighbour. A structure thinner than a grid pixel vanishes there; it then gets the grid
    pixels its source pixels overlap. ``margin`` pixels are added on each side, clipped to the grid.
    """
    from ..data.dataset import tight_box  # the evaluation's own box of a mask

    small = resize_mask(plane, (size, size))
    if small.any():
        box = tight_box(small).astype(np.float64)
    else:
        x0, y0, x1, y1 = tight_box(plane)
        h, w = plane.shape
        box = np.array([math.floor(x0 * size / w), math.floor(y0 * size / h),
                        math.ceil((x1 + 1) * size / w) - 1, math.ceil((y1 + 1) * size / h) - 1], dtype=np.float64)
    box += margin * np.array([-1, -1, 1, 1])
    return np.clip(box, 0, size - 1).astype(np.float32)


def follow_box(previous: np.ndarray, user_box: np.ndarray, margin: int = 0, grow: int = PROPAGATE_GROW) -> np.ndarray:
    """The box for the next slice of a propagation: the tight box of the neighbour's mask ``previous``
    (256 grid) grown by ``margin + grow`` pixels per side, kept inside ``user_box`` (the user's box on
    that slice, 256 grid). Where the two do not overlap the user's box is used."""
    derived = plane_box(previous, margin + grow)
    box = np.concatenate([np.maximum(derived[:2], user_box[:2]), np.minimum(derived[2:], user_box[2:])])
    if (box[:2] > box[2:]).any():
        return np.asarray(user_box, dtype=np.float32).copy()
    return box.astype(np.float32)


def slice_boxes(stack: SliceStack, canonical_mask: np.ndarray, margin: int = 0) -> dict[int, np.ndarray]:
    """Slice id -> box on the 256 grid, for every slice of ``stack`` where ``canonical_mask`` has foreground."""
    axis = stack.axis_index
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(canonical_mask.any(axis=others))
    return {int(k): plane_box(stack.plane(int(k), canonical_mask), margin) for k in present}


@dataclass
class PreparedObject:
    """An object ready for the model: context, intensity mapping and the box of each slice."""

    prompt: ObjectPrompt
    context: TaskContext
    bounds: dict
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    start: int | None = None  # the slice id propagation starts on when the user named it (``prompt.seed``)

    @property
    def label(self) -> int:
        return self.prompt.label
