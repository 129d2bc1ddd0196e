"""Catalog of a MedSegDB tree: every slice pair walked once into typed records, with a cached index.

Layouts (``[Sequence]`` may be any number of folders, including none):

- ``train/`` and ``eval/ID/``: ``Dataset/Modality_Task/[Sequence/]npy_imgs|npy_gts/X.npy``
- ``eval/{OOD,RealWorld}/{cross_site,cross_task}/``:
  ``Modality_Task/Dataset/[Sequence/]{finetune,inference}/npy_imgs|npy_gts/X.npy``

:func:`open_catalog` accepts the MedSegDB root, ``eval``, one split root (``train``, ``eval/ID``,
``eval/OOD`` with a shift type, ``eval/OOD/cross_site``) or any folder inside one. Slices are checked
cheaply while indexing (npy headers of images, full read of the small masks) and bad ones are
skipped and counted (or raise with ``strict=True``). The checks are :mod:`medsegx.data.npy`'s; the
walk and its cache in the user's cache folder (never in the data tree) are :mod:`medsegx.data.index`'s.
This module finds the split roots, reads each leaf folder's place in the layout and its context, and
serves the records as a :class:`Catalog`.
"""
from __future__ import annotations

import logging
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from .errors import DataError
from .index import index_split_root, list_subdirs
from .layout import (
    AUTO_LAYOUT,
    EVAL,
    EXTERNAL_LAYOUT,
    EXTERNAL_SPLITS,
    FOLDER_LAYOUTS,
    ID,
    ID_LAYOUT,
    IMAGES_DIR,
    MASKS_DIR,
    SHIFT_TYPES,
    SUBSETS,
    TRAIN,
    case_and_slice,
    group_key,
)
from .npy import LAYOUT, UNKNOWN_MODALITY
from .taxonomy import Context, Taxonomy, TaxonomyError, load_taxonomy

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------
# Where the splits are
# ---------------------------------------------------------------------------------------------
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
    if layout is not None and layout not in FOLDER_LAYOUTS:
        words = f"{', '.join(repr(w) for w in FOLDER_LAYOUTS[:-1])} or {FOLDER_LAYOUTS[-1]!r}"
        raise ValueError(f"layout must be {words}, got {layout!r}")

    def external(base: Path, prefix: str) -> list[SplitRoot]:
        shifts = (shift_type,) if shift_type else SHIFT_TYPES
        return [SplitRoot(base / s, f"{prefix}/{s}", EXTERNAL_LAYOUT) for s in shifts if (base / s).is_dir()]

    def evaluation(base: Path) -> list[SplitRoot]:
        found = [] if shift_type or not (base / ID).is_dir() else [SplitRoot(base / ID, ID, ID_LAYOUT)]
        for name in EXTERNAL_SPLITS:
            if (base / name).is_dir():
                found += external(base / name, name)
        return found

    children = list_subdirs(root)
    if layout is not None:
        found = [SplitRoot(root, root.name, layout)]
    elif root.name in SHIFT_TYPES:
        if shift_type and shift_type != root.name:
            raise ValueError(f"shift_type {shift_type!r} contradicts the data path {root}")
        found = [SplitRoot(root, f"{root.parent.name}/{root.name}", EXTERNAL_LAYOUT)]
    elif root.name in EXTERNAL_SPLITS or children & set(SHIFT_TYPES):
        found = external(root, root.name)
    elif TRAIN in children or EVAL in children:
        found = [] if shift_type or TRAIN not in children else [SplitRoot(root / TRAIN, TRAIN, ID_LAYOUT)]
        found += evaluation(root / EVAL) if EVAL in children else []
    elif root.name == EVAL or children & {ID, *EXTERNAL_SPLITS}:
        found = evaluation(root)
    elif root.name in (TRAIN, ID):
        found = [SplitRoot(root, root.name, ID_LAYOUT)]
    else:
        found = [_inside_split(root) or SplitRoot(root, root.name, AUTO_LAYOUT)]
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
            return SplitRoot(parent, parent.name, ID_LAYOUT, within)
        if parent.name in SHIFT_TYPES:
            return SplitRoot(parent, f"{parent.parent.name}/{parent.name}", EXTERNAL_LAYOUT, within)
    return None


def _parse_folder(rel: tuple[str, ...], layout: str) -> tuple[str, str, str | None, str | None]:
    """Leaf folder path (relative to its split root) -> dataset, task folder, sequence, subset."""
    if layout == AUTO_LAYOUT:
        layout = EXTERNAL_LAYOUT if any(p in SUBSETS for p in rel[2:]) else ID_LAYOUT
    if layout == ID_LAYOUT:
        if len(rel) < 2:
            raise ValueError("expected Dataset/Modality_Task/[Sequence/] above npy_imgs and npy_gts")
        return rel[0], rel[1], "/".join(rel[2:]) or None, None
    marks = [i for i in range(2, len(rel)) if rel[i] in SUBSETS]
    if not marks:
        raise ValueError("expected Modality_Task/Dataset/[Sequence/]finetune|inference above npy_imgs and npy_gts")
    i = marks[-1]
    return rel[1], rel[0], "/".join(rel[2:i] + rel[i + 1:]) or None, rel[i]


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
            entries, note = index_split_root(root.path, root.within, cache_dir=cache_dir, use_cache=use_cache,
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
