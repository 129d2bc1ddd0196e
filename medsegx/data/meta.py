"""``meta.json``: what conversion records beside the slices of a task folder, and how to read it back.

Every task folder written by conversion holds ``meta.json``: per case the source files, the
original size, spacing, origin, direction and orientation, the axis permutation/flips, the in-plane
shape and spacing of a slice before and after resampling (``spacing_256``, millimetres per pixel of
the 256 grid: rows, cols), the intensity mapping, and per slice (by file name) its case, slice id,
split and ``spacing_256``. :func:`slice_spacing` reads the latter for physical metrics; a case entry
is what :func:`medsegx.data.volume.write_back_prediction` needs to put predicted slices back into the
original geometry.

This module imports neither SimpleITK nor numpy: the evaluation reads spacings through it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from .errors import ConversionError

META_FILE = "meta.json"
META_FORMAT = "medsegx-convert/1"


def read_meta_file(path: Path) -> dict:
    """The JSON of ``path``; :class:`ConversionError` when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: unreadable metadata ({err})") from err


def write_meta(path: Path, header: Mapping, cases: Mapping[str, dict], slices: Mapping[str, dict]) -> None:
    """Merge ``cases`` (case -> entry) and their ``slices`` (file name -> entry) into the ``meta.json``
    at ``path`` under ``header``: an earlier entry of a case given here, and its slices, are replaced;
    other cases are kept. Written through a temporary file, so a reader never sees half a file."""
    meta = read_meta_file(path) if path.exists() else {}
    meta.update(header)
    kept_cases, kept_slices = meta.setdefault("cases", {}), meta.setdefault("slices", {})
    kept_slices = {k: v for k, v in kept_slices.items() if v.get("case") not in cases}  # drop stale slices
    kept_cases.update(cases)
    kept_slices.update(slices)
    meta["slices"] = kept_slices
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(_dump_meta(meta), encoding="utf-8")
    os.replace(tmp, path)


def _dump_meta(meta: dict) -> str:
    """JSON with one line per header field, per case and per slice: readable and diff-friendly."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, dict) and key in ("cases", "slices"):
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{body}\n }}" if value else f" {json.dumps(key)}: {{}}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def find_meta(slice_path: str | Path) -> Path | None:
    """``meta.json`` of the task folder a ``npy_imgs``/``npy_gts`` slice belongs to, if any."""
    folder = Path(slice_path).resolve().parent.parent
    for candidate in (folder, folder.parent):
        if (candidate / META_FILE).is_file():
            return candidate / META_FILE
    return None


@lru_cache(maxsize=64)
def _load_meta_cached(path: str, mtime: float) -> dict:
    return read_meta_file(Path(path))


def load_meta(path: str | Path) -> dict:
    """A ``meta.json`` (given it or its task folder), cached while the file is unchanged."""
    path = Path(path)
    if path.is_dir():
        path = path / META_FILE
    return _load_meta_cached(str(path), path.stat().st_mtime)


def slice_spacing(slice_path: str | Path) -> tuple[float, float] | None:
    """(row, col) millimetres per pixel of the 256 grid for a converted slice; None where unknown
    (no meta.json, or a 2-D picture, which has no physical pixel size)."""
    meta_path = find_meta(slice_path)
    if meta_path is None:
        return None
    meta = load_meta(meta_path)
    entry = meta.get("slices", {}).get(Path(slice_path).name)
    if entry is None:
        return None
    case = meta.get("cases", {}).get(entry.get("case"), {})
    if not case.get("spacing_known", case.get("kind") != "image2d"):
        return None
    return float(entry["spacing_256"][0]), float(entry["spacing_256"][1])
