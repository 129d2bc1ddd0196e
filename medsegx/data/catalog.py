"""Catalog of a MedSegDB tree: every slice pair walked once into typed records, with a cached index.

Layouts (``[Sequence]`` may be any number of folders, including none):

- ``train/`` and ``eval/ID/``: ``Dataset/Modality_Task/[Sequence/]npy_imgs|npy_gts/X.npy``
- ``eval/{OOD,RealWorld}/{cross_site,cross_task}/``:
  ``Modality_Task/Dataset/[Sequence/]{finetune,inference}/npy_imgs|npy_gts/X.npy``

:func:`open_catalog` accepts the MedSegDB root, ``eval``, one split root (``train``, ``eval/ID``,
``eval/OOD`` with a shift type, ``eval/OOD/cross_site``) or any folder inside one. Slices are checked
cheaply while indexing (npy headers of images, full read of the small masks) and bad ones are
skipped and counted (or raise with ``strict=True``). The result is cached per split root in the
user's cache folder (``$MEDSEGX_CACHE_DIR``, else ``$XDG_CACHE_HOME/medsegx/index`` or
``~/.cache/medsegx/index``), never in the data tree. A cached leaf folder is reused only while its
``npy_imgs``/``npy_gts`` listings, file sizes and modification times are unchanged; any other leaf
is checked again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from medsegx.data.layout import (
    EVAL,
    EXTERNAL_SPLITS,
    ID,
    IMAGES_DIR,
    MASKS_DIR,
    SHIFT_TYPES,
    SUBSETS,
    TRAIN,
    case_and_slice,
    group_key,
)
from medsegx.data.taxonomy import Context, Taxonomy, TaxonomyError, load_taxonomy
from medsegx.fileio import atomic_write

logger = logging.getLogger(__name__)

# Bump when the checks or the cached fields change: older caches are then rebuilt.
INDEX_FORMAT = 2

# Problem kinds. Every one skips the slice (or the folder), or raises with strict=True.
MISSING_MASK = "missing_mask"  # image without a mask of the same name
MISSING_IMAGE = "missing_image"  # mask without an image
UNREADABLE = "unreadable"  # not an npy file, truncated, or cannot be opened
NOT_NPY = "not_npy"  # a file without the .npy suffix in npy_imgs/npy_gts
BAD_IMAGE = "bad_image"  # image dtype or shape not supported
BAD_MASK = "bad_mask"  # mask dtype or shape not supported
SIZE_MISMATCH = "size_mismatch"  # image and mask of different height/width
EMPTY_MASK = "empty_mask"  # no foreground: a box prompt needs a target
LAYOUT = "layout"  # a folder that does not fit the MedSegDB layout
UNKNOWN_MODALITY = "unknown_modality"  # task folder whose modality is not in the taxonomy



class DataError(ValueError):
    """Bad data found with ``strict=True``, or a slice that can no longer be read as indexed."""


@dataclass(frozen=True)
class IndexProblem:
    """One skipped slice or folder: what is wrong and where."""

    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


@dataclass(frozen=True)
class SplitRoot:
    """A folder with one layout. ``layout``: "id" (Dataset/Task/..), "external" (Task/Dataset/../subset)
    or "auto" (decided per folder: external where a finetune/inference folder is present)."""

    path: Path
    split: str  # "train", "ID", "OOD/cross_site", ... or the folder's name for a custom root
    layout: str
    within: tuple[str, ...] = ()  # walk only this sub-folder (a path given below a split root)


@dataclass(frozen=True, slots=True)
class SliceRecord:
    """One image/mask pair and its context.

    ``organ`` is the (4,) context [body part, subregion, organ, task]; ``name`` is the report key:
    ``Dataset/Task/[Sequence/]X.npy`` (train, ID) or ``Task/Dataset/[Sequence/]X.npy`` (external).
    ``case_id``/``slice_id`` come from ``casenum_<case>_sliceid_<slice>.npy``; other file names are
    their own case (``case_id`` = file stem, ``slice_id`` = None).
    """

    image_path: Path
    mask_path: Path
    dataset: str
    task_folder: str
    task: str
    modality: str
    sequence: str | None
    split: str
    subset: str | None
    case_id: str
    slice_id: str | None
    modal: int
    organ: tuple[int, int, int, int]
    name: str
    group_key: tuple[str, ...]


@dataclass(frozen=True)
class Folder:
    """A leaf folder (the one holding npy_imgs/npy_gts) with everything its slices share.
    ``group_key`` is the report key of its slices (see :class:`SliceRecord`)."""

    root: str
    rel: str
    split: str
    dataset: str
    task_folder: str
    sequence: str | None
    subset: str | None
    context: Context
    group_key: tuple[str, ...]


@dataclass
class _LeafEntry:
    """Index of one leaf folder, as cached: slice names (utf-8 blob + offsets) and its problems."""

    rel: str
    sig: str
    blob: bytes
    offsets: np.ndarray  # (n+1,) int64, starting at 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # kind, file (rel), detail
    binarised: int = 0
    label_max: int = 0

    @property
    def count(self) -> int:
        return len(self.offsets) - 1


# ---------------------------------------------------------------------------------------------
# Where the splits are
# ---------------------------------------------------------------------------------------------
def _subdirs(path: Path) -> set[str]:
    with os.scandir(path) as it:
        return {e.name for e in it if e.is_dir() and not e.name.startswith(".")}


def find_split_roots(path: str | Path, shift_type: str | None = None, *,
                     splits: Collection[str] | None = None, layout: str | None = None) -> list[SplitRoot]:
    """The split roots under (or above) ``path``.

    ``shift_type`` ("cross_site"/"cross_task") keeps only that external shift (and drops train/ID).
    ``splits`` keeps roots whose split is listed or starts with a listed prefix ("OOD" keeps
    "OOD/cross_site" and "OOD/cross_task"). ``layout`` ("id"/"external") forces a custom root's
    layout; by default a folder not named like a MedSegDB level is read with ``layout="auto"``.
    """
    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} is not a folder")
    if shift_type is not None and shift_type not in SHIFT_TYPES:
        raise ValueError(f"shift_type must be one of {SHIFT_TYPES}, got {shift_type!r}")
    if layout is not None and layout not in ("id", "external", "auto"):
        raise ValueError(f"layout must be 'id', 'external' or 'auto', got {layout!r}")

    def external(base: Path, prefix: str) -> list[SplitRoot]:
        shifts = (shift_type,) if shift_type else SHIFT_TYPES
        return [SplitRoot(base / s, f"{prefix}/{s}", "external") for s in shifts if (base / s).is_dir()]

    def evaluation(base: Path) -> list[SplitRoot]:
        found = [] if shift_type or not (base / ID).is_dir() else [SplitRoot(base / ID, ID, "id")]
        for name in EXTERNAL_SPLITS:
            if (base / name).is_dir():
                found += external(base / name, name)
        return found

    children = _subdirs(root)
    if layout is not None:
        found = [SplitRoot(root, root.name, layout)]
    elif root.name in SHIFT_TYPES:
        if shift_type and shift_type != root.name:
            raise ValueError(f"shift_type {shift_type!r} contradicts the data path {root}")
        found = [SplitRoot(root, f"{root.parent.name}/{root.name}", "external")]
    elif root.name in EXTERNAL_SPLITS or children & set(SHIFT_TYPES):
        found = external(root, root.name)
    elif TRAIN in children or EVAL in children:
        found = [] if shift_type or TRAIN not in children else [SplitRoot(root / TRAIN, TRAIN, "id")]
        found += evaluation(root / EVAL) if EVAL in children else []
    elif root.name == EVAL or children & {ID, *EXTERNAL_SPLITS}:
        found = evaluation(root)
    elif root.name in (TRAIN, ID):
        found = [SplitRoot(root, root.name, "id")]
    else:
        found = [_inside_split(root) or SplitRoot(root, root.name, "auto")]
    if splits is not None:
        found = [r for r in found if any(r.split == s or r.split.startswith(s + "/") for s in splits)]
    if not found:
        raise FileNotFoundError(f"no MedSegDB split found at {root} (shift_type={shift_type}, splits={splits})")
    return found


def _inside_split(path: Path) -> SplitRoot | None:
    """A path below a split root (e.g. one dataset of train/): that root, walked from ``path`` only."""
    for depth, parent in enumerate(path.parents):
        within = path.parts[len(path.parts) - depth - 1:]
        if parent.name in (TRAIN, ID):
            return SplitRoot(parent, parent.name, "id", within)
        if parent.name in SHIFT_TYPES:
            return SplitRoot(parent, f"{parent.parent.name}/{parent.name}", "external", within)
    return None


def _parse_folder(rel: tuple[str, ...], layout: str) -> tuple[str, str, str | None, str | None]:
    """Leaf folder path (relative to its split root) -> dataset, task folder, sequence, subset."""
    if layout == "auto":
        layout = "external" if any(p in SUBSETS for p in rel[2:]) else "id"
    if layout == "id":
        if len(rel) < 2:
            raise ValueError("expected Dataset/Modality_Task/[Sequence/] above npy_imgs and npy_gts")
        return rel[0], rel[1], "/".join(rel[2:]) or None, None
    marks = [i for i in range(2, len(rel)) if rel[i] in SUBSETS]
    if not marks:
        raise ValueError("expected Modality_Task/Dataset/[Sequence/]finetune|inference above npy_imgs and npy_gts")
    i = marks[-1]
    return rel[1], rel[0], "/".join(rel[2:i] + rel[i + 1:]) or None, rel[i]


def _walk_leaves(split_root: Path, within: tuple[str, ...]) -> list[str]:
    """Leaf folders (those holding npy_imgs/npy_gts) as paths relative to ``split_root``, sorted."""
    found: list[str] = []

    def visit(rel: tuple[str, ...]) -> None:
        here = os.path.join(split_root, *rel)
        try:
            names = _subdirs(Path(here))
        except OSError as err:
            logger.warning("cannot list %s: %s", here, err)
            return
        if IMAGES_DIR in names or MASKS_DIR in names:
            found.append("/".join(rel))
        for name in sorted(names - {IMAGES_DIR, MASKS_DIR}):
            visit((*rel, name))

    visit(within)
    return found


def _leaf_signature(split_root: Path, rel: str) -> str:
    """A digest of a leaf's two listings with every file's size and modification time.

    Any added, removed, renamed, rewritten or touched slice changes it (folder times alone miss a
    file rewritten in place, and a reused temporary path can hold another tree of the same names).
    """
    digest = hashlib.blake2b(digest_size=16)
    for sub in (IMAGES_DIR, MASKS_DIR):
        folder = os.path.join(split_root, rel, sub)
        try:
            with os.scandir(folder) as it:
                entries = []
                for entry in it:
                    try:
                        st = entry.stat()
                        entries.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}")
                    except OSError:
                        entries.append(f"{entry.name}\0?")
        except OSError:
            entries = ["<unreadable>"]
        digest.update(sub.encode())
        digest.update("\n".join(sorted(entries)).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Checking one slice cheaply
# ---------------------------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


_HEADER_MEMO: dict[bytes, tuple[tuple[int, ...], np.dtype, bool]] = {}
_HEAD_READ = 256  # bytes read first: the whole header of any ordinary npy file (usually 128)


def _parse_npy_header(head: bytes, read_more: Callable[[int], bytes]) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the first bytes of an npy file; raises _Bad."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise _Bad(UNREADABLE, "not a .npy file (bad magic bytes)" if len(head) >= 6 else "empty or truncated file")
    major = head[6]
    if major == 1:
        end = 10 + int.from_bytes(head[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(head[8:12], "little")
    else:
        raise _Bad(UNREADABLE, f"unsupported .npy format version {major}")
    if end > len(head):
        head += read_more(end - len(head))
        if end > len(head):
            raise _Bad(UNREADABLE, "truncated .npy header")
    raw = head[:end]
    cached = _HEADER_MEMO.get(raw)
    if cached is None:
        # Headers repeat across a folder (same shape and dtype): parse each distinct one once.
        try:
            stream = io.BytesIO(raw)
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
        except (ValueError, OSError, SyntaxError) as err:
            raise _Bad(UNREADABLE, f"corrupt .npy header ({err})") from None
        cached = (tuple(shape), dtype, bool(fortran))
        if len(_HEADER_MEMO) < 4096:
            _HEADER_MEMO[raw] = cached
    return (*cached, end)


def _check_image(path: str) -> tuple[int, int]:
    """Image (H,W[,1|3]) uint8, from its header and file size only -> (H, W); raises _Bad."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            shape, dtype, _, offset = _parse_npy_header(os.read(fd, _HEAD_READ), lambda n: os.read(fd, n))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as err:
        raise _Bad(UNREADABLE, f"cannot read image: {err}") from None
    if dtype != np.uint8:
        raise _Bad(BAD_IMAGE, f"image dtype {dtype} is not supported: images must be uint8 0..255 "
                              "(window/rescale 16-bit or float data when converting)")
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))) or 0 in shape:
        raise _Bad(BAD_IMAGE, f"image shape {shape} is not (H,W), (H,W,1) or (H,W,3)")
    expected = offset + math.prod(shape)
    if size < expected:
        raise _Bad(UNREADABLE, f"truncated image file ({size} of {expected} bytes)")
    return shape[0], shape[1]


def read_npy_mask(path: str | Path) -> np.ndarray:
    """Read a mask file fully, checked -> (H,W) array (a trailing axis of 1 is dropped) of a bool,
    integer or float dtype, values as stored; raises _Bad."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            # One read of the whole (small) file; a second only for an unusually long header.
            data = os.read(fd, max(os.fstat(fd).st_size, _HEAD_READ))
            shape, dtype, fortran, offset = _parse_npy_header(data, lambda n: os.read(fd, n))
        finally:
            os.close(fd)
    except OSError as err:
        raise _Bad(UNREADABLE, f"cannot read mask: {err}") from None
    if dtype.hasobject or dtype.kind not in "buif":
        raise _Bad(BAD_MASK, f"mask dtype {dtype} is not supported (expected uint8 0/1)")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(data) < offset + nbytes:
        raise _Bad(UNREADABLE, f"truncated mask file ({len(data)} of {offset + nbytes} bytes)")
    mask = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    mask = mask.reshape(shape, order="F" if fortran else "C")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or 0 in mask.shape:
        raise _Bad(BAD_MASK, f"mask shape {shape} is not (H,W) or (H,W,1)")
    return mask


def _check_pair(image_path: str, mask_path: str) -> tuple[str, str, str, int]:
    """Check one pair -> (problem kind or "", detail, "npy_imgs"/"npy_gts": the file at fault,
    label_max). A usable pair has kind ""; its label_max > 1 flags a mask that needs binarising."""
    try:
        height, width = _check_image(image_path)
    except _Bad as bad:
        return bad.kind, bad.detail, IMAGES_DIR, 0
    try:
        mask = read_npy_mask(mask_path)
    except _Bad as bad:
        return bad.kind, bad.detail, MASKS_DIR, 0
    if mask.shape != (height, width):
        return SIZE_MISMATCH, f"image is {height}x{width} but mask is {mask.shape[0]}x{mask.shape[1]}", MASKS_DIR, 0
    label_max = mask.max()
    if not label_max > 0:
        return EMPTY_MASK, "mask has no foreground (a box prompt needs a target)", MASKS_DIR, 0
    binary = label_max == 1 and (mask.dtype.kind in "bu" or mask.min() >= 0)
    return "", "", "", 0 if binary else max(2, int(np.ceil(label_max)))


# ---------------------------------------------------------------------------------------------
# Indexing one leaf folder
# ---------------------------------------------------------------------------------------------
def _pack_names(names: list[str]) -> tuple[bytes, np.ndarray]:
    encoded = [n.encode("utf-8") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


def _list_npy(folder: str, label: str, problems: list[tuple[str, str, str]]) -> set[str]:
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return set()
    except OSError as err:
        problems.append((UNREADABLE, label, f"cannot list folder: {err}"))
        return set()
    names = set()
    for name in entries:
        if name.startswith("."):
            continue
        if name.endswith(".npy"):
            names.add(name)
        else:
            problems.append((NOT_NPY, f"{label}/{name}", "not a .npy file"))
    return names


def _scan_leaf(split_root: Path, rel: str, sig: str, pool: ThreadPoolExecutor | None) -> _LeafEntry:
    base = os.path.join(split_root, rel)
    img_dir, gt_dir = os.path.join(base, IMAGES_DIR), os.path.join(base, MASKS_DIR)
    prefix = f"{rel}/" if rel else ""
    problems: list[tuple[str, str, str]] = []
    images = _list_npy(img_dir, prefix + IMAGES_DIR, problems)
    masks = _list_npy(gt_dir, prefix + MASKS_DIR, problems)
    for name in sorted(images - masks):
        problems.append((MISSING_MASK, f"{prefix}{IMAGES_DIR}/{name}", f"no mask {MASKS_DIR}/{name}"))
    for name in sorted(masks - images):
        problems.append((MISSING_IMAGE, f"{prefix}{MASKS_DIR}/{name}", f"no image {IMAGES_DIR}/{name}"))
    pairs = sorted(images & masks)

    def check(name: str) -> tuple[str, str, str, int]:
        return _check_pair(os.path.join(img_dir, name), os.path.join(gt_dir, name))

    results = list(pool.map(check, pairs, chunksize=256)) if pool is not None and len(pairs) > 64 \
        else [check(n) for n in pairs]
    kept: list[str] = []
    binarised, label_max = 0, 0
    for name, (kind, detail, where, value) in zip(pairs, results, strict=True):
        if kind:
            problems.append((kind, f"{prefix}{where}/{name}", detail))
            continue
        kept.append(name)
        if value:
            binarised += 1
            label_max = max(label_max, value)
    blob, offsets = _pack_names(kept)
    return _LeafEntry(rel, sig, blob, offsets, problems, binarised, label_max)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
def _user_cache_dir() -> Path:
    if os.environ.get("MEDSEGX_CACHE_DIR"):
        return Path(os.environ["MEDSEGX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsegx" / "index"


def _cache_path(split_root: Path, cache_dir: str | Path | None) -> Path:
    """The index cache of ``split_root``: in ``cache_dir`` or the user cache folder, keyed by the tree's path."""
    digest = hashlib.sha1(str(split_root).encode("utf-8")).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(split_root.parts[-3:]))
    return Path(cache_dir if cache_dir is not None else _user_cache_dir()) / f"{slug}-{digest}.npz"


def _load_cache(path: Path) -> dict[str, _LeafEntry]:
    """The cached leaf entries of ``path``; empty when absent, unreadable or of another format."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            if meta.get("format") != INDEX_FORMAT:
                logger.info("index cache %s has format %s (want %d): rebuilding", path, meta.get("format"),
                            INDEX_FORMAT)
                return {}
            blob = z["names_blob"].tobytes()
            offsets = z["names_offsets"]
    except Exception as err:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        logger.warning("ignoring unreadable index cache %s: %s", path, err)
        return {}
    entries = {}
    for leaf in meta["leaves"]:
        start, count = leaf["start"], leaf["count"]
        lo, hi = int(offsets[start]), int(offsets[start + count])
        entries[leaf["rel"]] = _LeafEntry(
            leaf["rel"], str(leaf["sig"]), blob[lo:hi], offsets[start:start + count + 1] - lo,
            [tuple(p) for p in leaf["problems"]], leaf["binarised"], leaf["label_max"],
        )
    return entries


def _save_cache(path: Path, entries: Iterable[_LeafEntry]) -> Path | None:
    """Write the index cache atomically (concurrent readers, e.g. other ranks, see old or new) -> path or None."""
    entries = sorted(entries, key=lambda e: e.rel)
    leaves, blobs, offset_parts = [], [], [np.zeros(1, dtype=np.int64)]
    start, byte_pos = 0, 0
    for e in entries:
        leaves.append({"rel": e.rel, "sig": e.sig, "start": start, "count": e.count,
                       "problems": [list(p) for p in e.problems], "binarised": e.binarised,
                       "label_max": e.label_max})
        blobs.append(e.blob)
        offset_parts.append(e.offsets[1:] + byte_pos)
        start += e.count
        byte_pos += len(e.blob)
    meta = json.dumps({"format": INDEX_FORMAT, "leaves": leaves}).encode("utf-8")
    arrays = {
        "meta": np.frombuffer(meta, dtype=np.uint8),
        "names_blob": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "names_offsets": np.concatenate(offset_parts),
    }
    try:
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
        return path
    except OSError as err:
        logger.warning("index cache not written (%s: %s); the tree will be checked again next time", path, err)
        return None


def _index_split_root(root: SplitRoot, *, cache_dir: str | Path | None, use_cache: bool, refresh: bool,
                      pool: ThreadPoolExecutor | None) -> tuple[list[_LeafEntry], str]:
    """Leaf entries of ``root`` (only those under ``root.within``) and a note on cache use."""
    leaves = _walk_leaves(root.path, root.within)
    sign = lambda rel: _leaf_signature(root.path, rel)  # noqa: E731
    signatures = list(pool.map(sign, leaves)) if pool is not None and len(leaves) > 1 else [sign(r) for r in leaves]
    cache_path = _cache_path(root.path, cache_dir)
    cached = _load_cache(cache_path) if use_cache else {}
    reusable = {} if refresh else cached
    entries, scanned = [], 0
    for rel, sig in zip(leaves, signatures, strict=True):
        entry = reusable.get(rel)
        if entry is None or entry.sig != sig:
            entry = _scan_leaf(root.path, rel, sig, pool)
            scanned += 1
        entries.append(entry)
    note = f"{len(leaves) - scanned} of {len(leaves)} folders from cache"
    stale = set(cached) - set(leaves) if not root.within else set()
    if use_cache and (scanned or stale):
        merged: dict[str, _LeafEntry] = {}
        if root.within:  # a partial walk: keep the cached rest of the tree as it was
            prefix = "/".join(root.within)
            merged = {k: v for k, v in cached.items() if not (k == prefix or k.startswith(prefix + "/"))}
        merged.update({e.rel: e for e in entries})
        written = _save_cache(cache_path, merged.values())
        note += f", cache written to {written}" if written else ", cache not written"
    return entries, note


# ---------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------
class Catalog(Sequence[SliceRecord]):
    """An ordered, immutable view of indexed slices; items are :class:`SliceRecord` built on demand.

    Views (``select``, ``subset``, ``train_val_split``, slicing) share the underlying table, so a
    million-slice catalog costs a few tens of MB, not a million Python objects.
    """

    def __init__(self, folders: list[Folder], leaf_of: np.ndarray, blob: bytes, offsets: np.ndarray,
                 problems: Sequence[IndexProblem] = (), indices: np.ndarray | None = None):
        self._folders = folders
        self._leaf_of = leaf_of
        self._blob = blob
        self._offsets = offsets
        self._idx = np.arange(len(leaf_of), dtype=np.int64) if indices is None else indices
        self.problems: tuple[IndexProblem, ...] = tuple(problems)

    # -- Sequence protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._idx)

    @overload
    def __getitem__(self, i: int) -> SliceRecord: ...
    @overload
    def __getitem__(self, i: slice) -> Catalog: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._view(self._idx[i])
        j = int(self._idx[i])
        folder = self._folders[self._leaf_of[j]]
        file_name = self._blob[self._offsets[j]:self._offsets[j + 1]].decode("utf-8")
        case_id, slice_id = case_and_slice(file_name)
        base = os.path.join(folder.root, folder.rel)
        ctx = folder.context
        return SliceRecord(
            image_path=Path(base, IMAGES_DIR, file_name), mask_path=Path(base, MASKS_DIR, file_name),
            dataset=folder.dataset, task_folder=folder.task_folder, task=ctx.target, modality=ctx.modality,
            sequence=folder.sequence, split=folder.split, subset=folder.subset,
            case_id=case_id, slice_id=slice_id, modal=ctx.modal, organ=ctx.organ_indices,
            name="/".join((*folder.group_key, file_name)), group_key=folder.group_key,
        )

    def __iter__(self) -> Iterator[SliceRecord]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Catalog({len(self)} slices in {len(np.unique(self._leaf_of[self._idx]))} folders)"

    def _view(self, indices: np.ndarray) -> Catalog:
        return Catalog(self._folders, self._leaf_of, self._blob, self._offsets, self.problems,
                       np.asarray(indices, dtype=np.int64))

    # -- selection ---------------------------------------------------------------------------
    def take(self, positions: Sequence[int] | np.ndarray) -> Catalog:
        """The records at ``positions`` of this view, in that order."""
        return self._view(self._idx[np.asarray(positions, dtype=np.int64)])

    def select(self, *, split: str | Collection[str] | None = None, subset: str | Collection[str] | None = None,
               dataset: str | Collection[str] | None = None, task: str | Collection[str] | None = None,
               sequence: str | Collection[str] | None = None,
               where: Callable[[Folder], bool] | None = None) -> Catalog:
        """Records whose folder matches every given value (a string or a collection of strings).
        ``task`` matches the task folder name (e.g. "MRI_Prostate"); ``split`` also matches a prefix
        ("OOD" selects OOD/cross_site and OOD/cross_task)."""

        def ok(value: str | None, wanted: str | Collection[str] | None, prefix: bool = False) -> bool:
            if wanted is None:
                return True
            options = {wanted} if isinstance(wanted, str) else set(wanted)
            if value in options:
                return True
            return prefix and value is not None and any(value.startswith(o + "/") for o in options)

        keep = np.array([
            ok(f.split, split, True) and ok(f.subset, subset) and ok(f.dataset, dataset)
            and ok(f.task_folder, task) and ok(f.sequence, sequence) and (where is None or where(f))
            for f in self._folders
        ], dtype=bool)
        return self._view(self._idx[keep[self._leaf_of[self._idx]]])

    def groups(self) -> list[tuple[tuple[str, ...], Catalog]]:
        """Report groups in order: ``(dataset, task[, sequence])`` for train/ID,
        ``(task, dataset[, sequence])`` for external splits, each with its records."""
        leaves = self._leaf_of[self._idx]
        keys: dict[tuple[str, ...], int] = {}
        group_of_leaf = np.zeros(len(self._folders), dtype=np.int64)
        for leaf in dict.fromkeys(leaves.tolist()):
            group_of_leaf[leaf] = keys.setdefault(self._folders[leaf].group_key, len(keys))
        group_of = group_of_leaf[leaves]
        order = np.argsort(group_of, kind="stable")  # keeps record order inside a group
        bounds = np.searchsorted(group_of[order], np.arange(len(keys) + 1))
        return [(key, self._view(self._idx[order[bounds[g]:bounds[g + 1]]])) for key, g in keys.items()]

    @property
    def folders(self) -> list[Folder]:
        """The leaf folders present in this view, in order."""
        return [self._folders[i] for i in dict.fromkeys(self._leaf_of[self._idx].tolist())]

    # -- seeded subsets and splits -------------------------------------------------------------
    def case_keys(self) -> list[tuple[str, str]]:
        """(dataset, case id) of every record: slices of one patient share it across tasks/sequences."""
        keys = []
        for j in self._idx.tolist():
            name = self._blob[self._offsets[j]:self._offsets[j + 1]].decode("utf-8")
            keys.append((self._folders[self._leaf_of[j]].dataset, case_and_slice(name)[0]))
        return keys

    def _shuffled_cases(self, seed: int) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
        keys = self.case_keys()
        per_dataset: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for key in keys:
            per_dataset[key[0]].add(key)
        shuffled = {}
        for dataset, cases in per_dataset.items():
            # Seeded per dataset (not by position in the tree), so one site's subset does not
            # depend on which other sites were indexed with it.
            rng = np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])
            ordered = sorted(cases)
            shuffled[dataset] = [ordered[i] for i in rng.permutation(len(ordered))]
        return keys, shuffled

    def subset(self, fraction: float | None = None, *, n_cases: int | None = None, seed: int = 0) -> Catalog:
        """A seeded subset by whole cases, per dataset: ``ceil(fraction * cases)`` (at least 1) or
        ``n_cases`` cases of each dataset. Cases are shuffled once by ``seed`` and a prefix is taken,
        so subsets nest: with one seed the 15% cases are inside the 25% ones."""
        if (fraction is None) == (n_cases is None):
            raise ValueError("give exactly one of fraction and n_cases")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if n_cases is not None and n_cases < 1:
            raise ValueError(f"n_cases must be >= 1, got {n_cases}")
        keys, shuffled = self._shuffled_cases(seed)
        chosen: set[tuple[str, str]] = set()
        for cases in shuffled.values():
            # The tiny epsilon keeps 0.15 * 100 at 15 despite floating point (15.000000000000002).
            n = n_cases if n_cases is not None else max(1, int(np.ceil(fraction * len(cases) - 1e-9)))
            chosen.update(cases[:n])
        return self.take([i for i, k in enumerate(keys) if k in chosen])

    def train_val_split(self, val_fraction: float = 0.2, *, seed: int = 0) -> tuple[Catalog, Catalog]:
        """Seeded split by whole cases, per dataset: ``round(val_fraction * cases)`` cases (at least
        one when a dataset has two or more cases, none when it has one) go to validation."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        keys, shuffled = self._shuffled_cases(seed)
        val_cases: set[tuple[str, str]] = set()
        for cases in shuffled.values():
            n_val = int(round(val_fraction * len(cases)))
            if val_fraction > 0 and len(cases) >= 2:
                n_val = min(max(n_val, 1), len(cases) - 1)
            # The validation cases come from the END of the shuffle, training subsets from its
            # start: a data-ratio subset of the training part then still nests.
            val_cases.update(cases[len(cases) - n_val:] if n_val else [])
        in_val = [k in val_cases for k in keys]
        return (self.take([i for i, v in enumerate(in_val) if not v]),
                self.take([i for i, v in enumerate(in_val) if v]))


def _folder_for(root: SplitRoot, rel: str, taxonomy: Taxonomy) -> Folder:
    parts = tuple(rel.split("/")) if rel else ()
    dataset, task_folder, sequence, subset = _parse_folder(parts, root.layout)
    context = taxonomy.context(task_folder)
    key = group_key(dataset, task_folder, sequence, external=subset is not None)
    return Folder(str(root.path), rel, root.split, dataset, task_folder, sequence, subset, context, key)


def open_catalog(path: str | Path, shift_type: str | None = None, *, splits: Collection[str] | None = None,
                 layout: str | None = None, strict: bool = False, taxonomy: Taxonomy | None = None,
                 cache_dir: str | Path | None = None, use_cache: bool = True, refresh: bool = False,
                 workers: int | None = None) -> Catalog:
    """Index the MedSegDB tree at ``path`` (see :func:`find_split_roots`) into a :class:`Catalog`.

    Bad slices and folders are skipped, counted and logged (the first files of each kind named);
    with ``strict=True`` any of them raises :class:`DataError` instead. The index is cached per
    split root (``cache_dir`` overrides where; ``use_cache=False`` neither reads nor writes it;
    ``refresh=True`` rebuilds it). ``workers`` threads check slices on a first run.
    """
    taxonomy = taxonomy or load_taxonomy()
    roots = find_split_roots(path, shift_type, splits=splits, layout=layout)
    # Threads overlap file-system latency (network storage, cold disks); they do not need cores.
    workers = 8 if workers is None else workers
    folders: list[Folder] = []
    leaf_parts, blobs, offset_parts = [], [], [np.zeros(1, dtype=np.int64)]
    problems: list[IndexProblem] = []
    notes = []
    byte_pos = 0
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for root in roots:
            entries, note = _index_split_root(root, cache_dir=cache_dir, use_cache=use_cache,
                                              refresh=refresh, pool=pool)
            notes.append(f"{root.split}: {note}")
            for entry in entries:
                problems += [IndexProblem(k, str(root.path / f), d) for k, f, d in entry.problems]
                folder_path = root.path / entry.rel
                try:
                    folder = _folder_for(root, entry.rel, taxonomy)
                except TaxonomyError as err:
                    problems.append(IndexProblem(UNKNOWN_MODALITY, str(folder_path),
                                                 f"{err}; {entry.count} slices skipped"))
                    continue
                except ValueError as err:
                    problems.append(IndexProblem(LAYOUT, str(folder_path), f"{err}; {entry.count} slices skipped"))
                    continue
                if entry.binarised:
                    logger.warning("%d of %d masks in %s hold values other than 0/1 (max %d); they are "
                                   "binarised as mask > 0", entry.binarised, entry.count,
                                   folder_path / MASKS_DIR, entry.label_max)
                leaf_parts.append(np.full(entry.count, len(folders), dtype=np.int32))
                folders.append(folder)
                blobs.append(entry.blob)
                offset_parts.append(entry.offsets[1:] + byte_pos)
                byte_pos += len(entry.blob)
    finally:
        if pool is not None:
            pool.shutdown()
    leaf_of = np.concatenate(leaf_parts) if leaf_parts else np.zeros(0, dtype=np.int32)
    catalog = Catalog(folders, leaf_of, b"".join(blobs), np.concatenate(offset_parts), problems)
    logger.info("indexed %d slices in %d folders under %s (%s)", len(catalog), len(folders),
                os.path.abspath(path), "; ".join(notes))
    if problems:
        message = describe_problems(problems)
        if strict:
            raise DataError(f"bad data under {os.path.abspath(path)} (strict mode):\n{message}")
        logger.warning("skipped bad data under %s:\n%s", os.path.abspath(path), message)
    return catalog


def describe_problems(problems: Sequence[IndexProblem], first: int = 3) -> str:
    """One line per kind: count and the first files, e.g. ``empty_mask: 2 (a.npy: ...; b.npy: ...)``."""
    by_kind: dict[str, list[IndexProblem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        shown = "; ".join(str(p) for p in items[:first])
        more = f"; ... {len(items) - first} more" if len(items) > first else ""
        lines.append(f"  {kind}: {len(items)} ({shown}{more})")
    return "\n".join(lines)


def problem_counts(problems: Sequence[IndexProblem]) -> dict[str, int]:
    """Number of problems of each kind."""
    return dict(Counter(p.kind for p in problems))


def problem_summary(catalog: Catalog) -> str:
    """': N bad file(s) or folder(s) skipped (kind count, ...)' for an error message, or ''."""
    problems = getattr(catalog, "problems", ())
    if not problems:
        return ""
    counts = sorted(problem_counts(problems).items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{kind} {n}" for kind, n in counts)
    return f": {len(problems)} bad file(s) or folder(s) skipped ({listed}; the log lists them)"
