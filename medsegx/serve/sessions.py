"""Open images of the server: one :class:`ImageSession` per image, kept by a :class:`SessionStore`.

A session holds the image as read (:func:`~medsegx.inference.case.read_case_image`), its canonical
slice stack (:func:`~medsegx.data.volume.slice_stack`, built once) and the label map the user is
making, in the image's stored voxel order ((Z, Y, X); Z = 1 for a 2-D image). A segment request is
one :meth:`~medsegx.inference.segmenter.Segmenter.predict` call, the pipeline ``predict.py`` runs: the box goes
through the same re-orientation, window by task and write-back. The slices it predicted replace
that label's voxels on those slices (other labels are overwritten where the new mask covers
them, as later objects win in ``predict.py``). Erase and every segment call can be undone.

The model slices along the stored z axis (the slicing axis is chosen per image so that it is), so
a 2-D box drawn on displayed slice z prompts exactly that slice. Requests on one image hold its
lock; different images run side by side.
"""
from __future__ import annotations

import io
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data.errors import ConversionError
from ..data.intensity import intensity_bounds, to_display
from ..data.presets import AXIAL, CORONAL, HU_MODALITIES, LPS, SAGITTAL, default_window, parse_window
from ..data.sources import check_image_dimensions
from ..data.taxonomy import load_taxonomy
from ..data.volume import orientation_plan, slice_stack
from ..errors import UserError
from ..inference.case import (
    CASE_EXTENSIONS,
    PredictOptions,
    output_suffix,
    read_case_image,
    stored_slice_index,
    write_image_atomic,
    write_json_atomic,
)
from ..inference.prompts import (
    PROPAGATE_GROW,
    ObjectPrompt,
    case_name,
    check_box_inside,
    check_label,
    parse_box,
)
from ..inference.segmenter import Segmenter

logger = logging.getLogger(__name__)

UPLOADABLE = tuple(ext for ext in CASE_EXTENSIONS if ext not in (".mhd", ".nhdr"))  # single-file formats
UNDO_DEPTH = 30
_SEGMENT_FIELDS = {"box", "z", "label", "modality", "task", "propagate", "seed", "propagate_grow", "window"}
# the numpy axis of the stored array that is z -> the canonical slicing axis that runs along it
_AXIS_OF_ITK_AXIS = {2: AXIAL, 1: CORONAL, 0: SAGITTAL}


class ApiError(Exception):
    """An answer other than success: HTTP ``status`` and a one-line message naming what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def png_bytes(array: np.ndarray) -> bytes:
    """A (H, W) or (H, W, 3) uint8 array as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _slicing_axis(image: sitk.Image) -> str:
    """The canonical (LPS) slicing axis that runs along the stored z axis (numpy axis 0)."""
    if image.GetDimension() == 2:
        return AXIAL
    perm, _ = orientation_plan(image.GetDirection())
    return _AXIS_OF_ITK_AXIS[perm.index(2)]


def view_transform(stack) -> dict:
    """How the page turns a stored slice (rows y, columns x) into the slice as the model sees it (LPS:
    axial slices with anterior at the top and the patient's right on the left): transpose first, then
    flip the displayed columns / rows. Found by pushing voxel positions through the stack's own
    re-ordering (:meth:`~medsegx.data.volume.SliceStack.to_canonical` and ``plane``)."""
    if stack.is_2d:
        return {"transpose": False, "flip_x": False, "flip_y": False}
    rows, cols = 3, 4  # a stand-in stored shape; only the axis order and directions matter
    code = np.broadcast_to(np.arange(rows * cols).reshape(rows, cols), (2, rows, cols))
    plane = stack.plane(0, stack.to_canonical(code))
    transpose = plane.shape != (rows, cols)
    row_of = (lambda c: c % cols) if transpose else (lambda c: c // cols)  # stored axis shown down the rows
    col_of = (lambda c: c // cols) if transpose else (lambda c: c % cols)
    return {"transpose": bool(transpose), "flip_x": bool(col_of(plane[0, -1]) < col_of(plane[0, 0])),
            "flip_y": bool(row_of(plane[-1, 0]) < row_of(plane[0, 0]))}


class ImageSession:
    """One open image and the label map being made for it (see the module docstring)."""

    def __init__(self, image_id: str, case: str, source: Path, display_name: str, image: sitk.Image,
                 owned_folder: Path | None = None) -> None:
        check_image_dimensions(image, display_name)
        self.id, self.case, self.source, self.name = image_id, case, source, display_name
        self.image = image
        self.owned_folder = owned_folder  # an upload's temporary folder, removed with the session
        self.is_2d = image.GetDimension() == 2
        self.axis = _slicing_axis(image)
        self.stack = slice_stack(image, source, self.axis, LPS)
        self.intensity_cache: dict = {}
        self.pixels = sitk.GetArrayViewFromImage(image)  # stored order, no copy
        if self.is_2d:
            self.pixels = self.pixels[None]
        self.colour = self.pixels.ndim == 4
        self.shape = tuple(int(n) for n in self.pixels.shape[:3])  # (Z, Y, X)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.objects: dict[int, dict] = {}
        self.undo_stack: list[tuple[dict[int, np.ndarray], dict[int, dict]]] = []
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.display = self._default_display()
        self.range = None if self.colour else [float(self.pixels.min()), float(self.pixels.max())]

    # ------------------------------------------------------------------ what the page shows
    def _default_display(self) -> dict:
        if self.colour or self.stack.is_8bit:
            return {"level": 127.5, "width": 255.0}
        bounds = intensity_bounds(self.stack.volume, "", "", None)
        return {"level": (bounds["lo"] + bounds["hi"]) / 2, "width": max(bounds["hi"] - bounds["lo"], 1e-3)}

    def info(self) -> dict:
        spacing = [float(v) for v in reversed(self.image.GetSpacing())]  # (z,) y, x
        if self.is_2d:
            spacing = [1.0, *spacing]
        return {
            "id": self.id, "case": self.case, "name": self.name, "shape": list(self.shape), "spacing": spacing,
            "kind": "image2d" if self.is_2d else "volume", "colour": self.colour, "slicing_axis": self.axis,
            "orientation": self.stack.record.get("orientation"), "view": view_transform(self.stack),
            "range": self.range,
            "display": {k: round(float(v), 3) for k, v in self.display.items()},
            "objects": self.object_table(),
        }

    def _check_z(self, z: object, field: str = "z") -> int:
        if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z < self.shape[0]:
            raise ApiError(400, f"{field}: slice {z!r} outside 0..{self.shape[0] - 1}")
        return z

    def slice_png(self, z: int, level: float | None = None, width: float | None = None) -> bytes:
        """Stored slice ``z`` for display: windowed by ``level``/``width`` (default: the image's display window)."""
        self._check_z(z)
        plane = self.pixels[z]
        if self.colour:  # as slice_stack takes it: the first three channels, or the first of fewer
            shown = plane[..., :3] if plane.shape[-1] >= 3 else plane[..., 0]
            return png_bytes(np.clip(shown, 0, 255).astype(np.uint8))
        level = self.display["level"] if level is None else level
        width = self.display["width"] if width is None else width
        if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
            raise ApiError(400, f"window: level {level} and width {width} must be finite, width > 0")
        shown = to_display(plane, {"lo": level - width / 2, "hi": level + width / 2})
        return png_bytes(np.clip(np.rint(shown), 0, 255).astype(np.uint8))

    def label_png(self, z: int) -> bytes:
        """Stored slice ``z`` of the label map, pixel value = label value."""
        self._check_z(z)
        with self.lock:
            return png_bytes(self.labels[z].copy())

    def label_image(self) -> sitk.Image:
        """The label map in the image's own geometry (size, spacing, origin, direction)."""
        with self.lock:
            array = self.labels[0].copy() if self.is_2d else self.labels.copy()
        out = sitk.GetImageFromArray(array)
        out.SetSpacing(self.image.GetSpacing())
        out.SetOrigin(self.image.GetOrigin())
        out.SetDirection(self.image.GetDirection())
        return out

    def object_table(self) -> list[dict]:
        """Every label value present: voxels, volume (ml; area for 2-D), slice range, task and modality."""
        with self.lock:
            return self._table()

    def _table(self) -> list[dict]:
        counts = np.bincount(self.labels.ravel(), minlength=256)
        voxel = float(np.prod(self.image.GetSpacing()))
        rows = []
        for label in np.flatnonzero(counts[1:]) + 1:
            label = int(label)
            present = np.flatnonzero((self.labels == label).any(axis=(1, 2)))
            meta = self.objects.get(label, {})
            row = {"label": label, "task": meta.get("task"), "modality": meta.get("modality"),
                   "voxels": int(counts[label]), "slices": [int(present[0]), int(present[-1])]}
            if self.is_2d:
                row["area_mm2"] = round(counts[label] * voxel, 3)
            else:
                row["volume_ml"] = round(counts[label] * voxel / 1000.0, 3)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ changing the label map
    def parse_segment(self, body: object) -> tuple[ObjectPrompt, PredictOptions]:
        """The prompt and options of a segment request; :class:`ApiError` 400 naming the bad field."""
        if not isinstance(body, Mapping):
            raise ApiError(400, 'body: expected a JSON object {"box": [...], "modality": "CT", ...}')
        unknown = sorted(set(body) - _SEGMENT_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}; allowed: {sorted(_SEGMENT_FIELDS)}")
        if "box" not in body:
            raise ApiError(400, "box: required ([x0, y0, z0, x1, y1, z1], or [x0, y0, x1, y1] with z)")
        box = list(parse_box(body["box"], "box"))
        drawn_on = None  # the slice of a 4-number box
        if len(box) == 4 and not self.is_2d:
            if "z" not in body:
                raise ApiError(400, "z: required with a 4-number box on a volume (the slice of the box)")
            drawn_on = self._check_z(body["z"])
            box = [box[0], box[1], drawn_on, box[2], box[3], drawn_on]
        elif "z" in body:
            if len(box) == 6:
                raise ApiError(400, "z: give z only with a 4-number box (a 6-number box has z0 and z1)")
            if body["z"] != 0:
                raise ApiError(400, f"z: a 2-D image has one slice (z = 0), got {body['z']!r}")
        check_box_inside(tuple(box), self.image.GetSize(), "box")  # the request's one check of the box
        label = check_label(body.get("label", 1), "label")
        modality = body.get("modality")
        if not isinstance(modality, str) or not modality.strip():
            raise ApiError(400, "modality: required, a taxonomy modality or alias (CT, MRI, US, ...)")
        try:
            modality = load_taxonomy().canonical_modality(modality.strip())
        except UserError as err:
            raise ApiError(400, f"modality: {err}") from None
        task = body.get("task")
        if task is not None and (not isinstance(task, str) or not task.strip()):
            raise ApiError(400, f"task: a taxonomy task name such as Liver, got {task!r}")
        task = task.strip() if task else None
        box, propagate, seed, grow = self._propagation(body, box, drawn_on)
        window = body.get("window")
        if window is not None:
            try:
                window = parse_window(str(window))
            except ValueError as err:
                raise ApiError(400, f"window: {err}") from None
        opts = PredictOptions(modality=modality, task=task, window=window, axis=self.axis, orient=LPS,
                              propagate=propagate, propagate_grow=grow)
        return ObjectPrompt(label=label, task=task, box=tuple(box), seed=seed), opts

    def _propagation(self, body: Mapping, box: list[int], drawn_on: int | None):
        """``propagate``, ``seed`` and ``propagate_grow`` of a request -> (box, propagate, seed, grow).

        A 4-number box with ``z`` and ``propagate`` is drawn on slice z and propagates through the whole
        volume until the object vanishes (``seed`` = z, the box's z range every slice); a 6-number box
        is the object's first and last slice, with ``seed`` the slice its x-y extent was drawn on (else
        its 3-D bounding box, started on the middle slice), as ``predict.py --seed_slice``.
        """
        propagate = body.get("propagate", False)
        if not isinstance(propagate, bool):
            raise ApiError(400, f"propagate: true or false, got {propagate!r}")
        seed, grow = body.get("seed"), body.get("propagate_grow", PROPAGATE_GROW)
        if isinstance(grow, bool) or not isinstance(grow, int) or grow < 0:
            raise ApiError(400, f"propagate_grow: pixels of the 256 grid, an integer >= 0, got {grow!r}")
        if not propagate:
            if seed is not None:
                raise ApiError(400, "seed: the slice propagation starts on; it needs propagate: true")
            return box, False, None, grow
        if self.is_2d:
            raise ApiError(400, "propagate: a 2-D image has one slice")
        if drawn_on is not None:
            if seed is not None:
                raise ApiError(400, "seed: give seed with a 6-number box (a 4-number box starts on its z)")
            return [box[0], box[1], 0, box[3], box[4], self.shape[0] - 1], True, drawn_on, grow
        if seed is not None:
            seed = self._check_z(seed, "seed")
            if not box[2] <= seed <= box[5]:
                raise ApiError(400, f"seed: slice {seed} is outside the box's slices {box[2]}..{box[5]}")
        return box, True, seed, grow

    def segment(self, runner, body: object) -> dict:
        """One segment request (see the module docstring): which slices were written, the object's voxels."""
        prompt, opts = self.parse_segment(body)
        t0 = time.perf_counter()
        with self.lock:
            prediction = Segmenter.from_runner(runner).predict(self.case, self.image, self.source, [prompt], opts,
                                                               stack=self.stack, intensity_cache=self.intensity_cache)
            predicted = prediction.array
            if self.is_2d:
                predicted = predicted[None]
            per_slice = prediction.results[0]
            _, to_stored = stored_slice_index(self.stack.record)
            stored = {k: (0 if to_stored is None else to_stored(k)) for k in per_slice}
            written = sorted(stored.values())
            label = prompt.label
            self._remember(written)
            for z in written:
                plane = self.labels[z]
                plane[plane == label] = 0
                plane[predicted[z] == label] = label
            context = prediction.objects[0].context
            self.objects[label] = {"task": context.task, "modality": context.modality}
            table = self._table()
        voxels = next((row["voxels"] for row in table if row["label"] == label), 0)
        return {
            "label": label, "slices": written, "voxels": voxels, "task": context.task, "modality": context.modality,
            "iou_pred": {str(stored[k]): [round(v, 4) for v in out.iou_pred] for k, out in sorted(per_slice.items())},
            "notes": prediction.notes, "seconds": round(time.perf_counter() - t0, 3), "objects": table,
        }

    def _remember(self, slices) -> None:
        self.undo_stack.append(({int(z): self.labels[z].copy() for z in slices}, {k: dict(v) for k, v in
                                                                                   self.objects.items()}))
        del self.undo_stack[:-UNDO_DEPTH]

    def erase(self, label: int) -> dict:
        check_label(label, "label")
        with self.lock:
            present = np.flatnonzero((self.labels == label).any(axis=(1, 2)))
            if not present.size and label not in self.objects:
                raise ApiError(404, f"label {label}: no such object in image {self.id}")
            self._remember(present)
            for z in present:
                plane = self.labels[z]
                plane[plane == label] = 0
            self.objects.pop(label, None)
            return {"erased": label, "slices": [int(z) for z in present], "objects": self._table()}

    def undo(self) -> dict:
        with self.lock:
            if not self.undo_stack:
                raise ApiError(400, "undo: nothing to undo")
            slices, objects = self.undo_stack.pop()
            for z, plane in slices.items():
                self.labels[z] = plane
            self.objects = objects
            return {"slices": sorted(slices), "objects": self._table()}

    def save(self, output_dir: Path) -> dict:
        """``<output_dir>/<case>.nii.gz`` (``.png`` for 2-D) and ``<case>.json`` (the objects), atomically."""
        image = self.label_image()
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / (self.case + output_suffix("image2d" if self.is_2d else "volume"))
        replaced = path.exists()
        table = self.object_table()
        write_image_atomic(image, path)
        write_json_atomic({"input": self.name, "output": path.name, "shape": list(self.shape), "objects": table},
                          output_dir / f"{self.case}.json")
        logger.info("%s: saved %s (%d object(s))", self.name, path, len(table))
        return {"path": str(path), "replaced": replaced, "objects": table}

    def close(self) -> None:
        if self.owned_folder is not None:
            shutil.rmtree(self.owned_folder, ignore_errors=True)


# --------------------------------------------------------------------------- the store


def resolve_under(root: Path, relative: object) -> Path:
    """``root/relative`` after resolving symbolic links; :class:`ApiError` 403 when it leaves ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise ApiError(400, "path: required, a file path relative to --root")
    given = Path(relative)
    if given.is_absolute() or relative.startswith(("/", "\\")):
        raise ApiError(403, f"path {relative!r}: absolute paths are refused; give a path relative to --root")
    if ".." in given.parts:
        raise ApiError(403, f"path {relative!r}: '..' is refused; give a path inside --root")
    root = root.resolve()
    target = (root / given).resolve()
    if target != root and root not in target.parents:
        raise ApiError(403, f"path {relative!r}: resolves outside --root (a symbolic link?)")
    if not target.exists():
        raise ApiError(404, f"path {relative!r}: no such file under --root")
    return target


class SessionStore:
    """The open images: at most ``max_images`` (the least recently used is closed beyond that)."""

    def __init__(self, root: Path | None, output_dir: Path, max_images: int = 8,
                 upload_dir: Path | None = None) -> None:
        self.root = root.resolve() if root is not None else None
        self.output_dir = output_dir
        self.max_images = max_images
        self._sessions: OrderedDict[str, ImageSession] = OrderedDict()
        self._lock = threading.Lock()
        self._upload_root = Path(tempfile.mkdtemp(prefix="medsegx-serve-uploads-", dir=upload_dir))

    def open_path(self, relative: object) -> ImageSession:
        if self.root is None:
            raise ApiError(403, "path: this server was started without --root; upload the file instead")
        path = resolve_under(self.root, relative)
        if path.is_file() and not path.name.lower().endswith(CASE_EXTENSIONS):
            raise ApiError(400, f"path {relative!r}: not an image file (supported: {' '.join(CASE_EXTENSIONS)})")
        name = str(path.relative_to(self.root))
        return self._add(case_name(path), path, name, lambda: read_case_image(path))

    def open_upload(self, filename: str, read_into) -> ImageSession:
        """An uploaded file: ``read_into(path)`` writes its bytes; kept in a temporary folder until closed."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in Path(filename or "").name).lstrip(".")
        if not safe.lower().endswith(UPLOADABLE):
            raise ApiError(400, f"file {filename!r}: not an image file that uploads as one file "
                                f"(supported: {' '.join(UPLOADABLE)})")
        folder = Path(tempfile.mkdtemp(dir=self._upload_root))
        path = folder / safe
        try:
            read_into(path)
            return self._add(case_name(path) or "upload", path, f"upload:{safe}", lambda: read_case_image(path),
                             owned=folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _add(self, case: str, path: Path, name: str, read, owned: Path | None = None) -> ImageSession:
        t0 = time.perf_counter()
        try:
            image = read()
            session = ImageSession(secrets.token_hex(6), case, path, name, image, owned)
        except (ConversionError, UserError) as err:
            raise ApiError(400, str(err)) from None
        closed = []
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_images:
                closed.append(self._sessions.popitem(last=False)[1])
        for old in closed:
            logger.warning("closed image %s (%s): more than --max_images %d open", old.id, old.name, self.max_images)
            old.close()
        logger.info("opened %s as %s: %s, slicing %s (%.2f s)", name, session.id,
                    " x ".join(map(str, session.shape)), session.axis, time.perf_counter() - t0)
        return session

    def get(self, image_id: str) -> ImageSession:
        with self._lock:
            session = self._sessions.get(image_id)
            if session is None:
                raise ApiError(404, f"image {image_id!r}: not open (closed, or never opened)")
            self._sessions.move_to_end(image_id)
        session.last_used = time.monotonic()
        return session

    def delete(self, image_id: str) -> None:
        session = self.get(image_id)
        with session.lock, self._lock:
            self._sessions.pop(image_id, None)
        session.close()

    def __len__(self) -> int:
        return len(self._sessions)

    def list_files(self, limit: int = 2000) -> list[str]:
        """Image files under ``root`` (relative paths, no hidden entries, no links leaving ``root``)."""
        if self.root is None:
            return []
        found = []
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(CASE_EXTENSIONS):
                    continue
                path = Path(folder) / name
                resolved = path.resolve()
                if self.root not in resolved.parents:
                    continue
                found.append(str(path.relative_to(self.root)))
                if len(found) >= limit:
                    return found
        return found

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
        shutil.rmtree(self._upload_root, ignore_errors=True)


def default_display(modality: str | None, task: str | None) -> dict | None:
    """The CT window of ``modality``/``task`` for display (HU modalities), else None (the image's own)."""
    if not modality:
        return None
    canonical = load_taxonomy().canonical_modality(modality)
    if canonical not in HU_MODALITIES:
        return None
    level, width = default_window(canonical, task or "")
    return {"level": level, "width": width}
