"""The index of a split root: its leaf folders walked, each one's slices checked, the result cached.

A leaf folder is one holding ``npy_imgs``/``npy_gts``. Its slices are checked cheaply
(:func:`medsegx.data.npy.check_pair`) and the names of the usable ones packed into one blob. The index
is cached per split root in the user's cache folder (``$MEDSEGX_CACHE_DIR``, else
``$XDG_CACHE_HOME/medsegx/index`` or ``~/.cache/medsegx/index``), never in the data tree. A cached
leaf is reused only while its signature (the two listings with every file's size and modification
time) is unchanged; any other leaf is checked again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from .layout import IMAGES_DIR, MASKS_DIR
from .npy import MISSING_IMAGE, MISSING_MASK, NOT_NPY, UNREADABLE, check_pair

logger = logging.getLogger(__name__)

# Bump when the checks or the cached fields change: older caches are then rebuilt.
INDEX_FORMAT = 2


@dataclass
class LeafEntry:
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
# Leaf folders and their signatures
# ---------------------------------------------------------------------------------------------
def list_subdirs(path: Path) -> set[str]:
    """Names of the visible sub-folders of ``path``."""
    with os.scandir(path) as it:
        return {e.name for e in it if e.is_dir() and not e.name.startswith(".")}


def _walk_leaves(split_root: Path, within: tuple[str, ...]) -> list[str]:
    """Leaf folders (those holding npy_imgs/npy_gts) as paths relative to ``split_root``, sorted."""
    found: list[str] = []

    def visit(rel: tuple[str, ...]) -> None:
        here = os.path.join(split_root, *rel)
        try:
            names = list_subdirs(Path(here))
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


def _scan_leaf(split_root: Path, rel: str, sig: str, pool: ThreadPoolExecutor | None) -> LeafEntry:
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
        return check_pair(os.path.join(img_dir, name), os.path.join(gt_dir, name))

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
    return LeafEntry(rel, sig, blob, offsets, problems, binarised, label_max)


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


def _load_cache(path: Path) -> dict[str, LeafEntry]:
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
        entries[leaf["rel"]] = LeafEntry(
            leaf["rel"], str(leaf["sig"]), blob[lo:hi], offsets[start:start + count + 1] - lo,
            [tuple(p) for p in leaf["problems"]], leaf["binarised"], leaf["label_max"],
        )
    return entries


def _save_cache(path: Path, entries: Iterable[LeafEntry]) -> Path | None:
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


def index_split_root(split_root: Path, within: tuple[str, ...] = (), *, cache_dir: str | Path | None = None,
                     use_cache: bool = True, refresh: bool = False,
                     pool: ThreadPoolExecutor | None = None) -> tuple[list[LeafEntry], str]:
    """Leaf entries of ``split_root`` (only those under its sub-folder ``within``) and a note on cache use."""
    leaves = _walk_leaves(split_root, within)
    sign = lambda rel: _leaf_signature(split_root, rel)  # noqa: E731
    signatures = list(pool.map(sign, leaves)) if pool is not None and len(leaves) > 1 else [sign(r) for r in leaves]
    cache_path = _cache_path(split_root, cache_dir)
    cached = _load_cache(cache_path) if use_cache else {}
    reusable = {} if refresh else cached
    entries, scanned = [], 0
    for rel, sig in zip(leaves, signatures, strict=True):
        entry = reusable.get(rel)
        if entry is None or entry.sig != sig:
            entry = _scan_leaf(split_root, rel, sig, pool)
            scanned += 1
        entries.append(entry)
    note = f"{len(leaves) - scanned} of {len(leaves)} folders from cache"
    stale = set(cached) - set(leaves) if not within else set()
    if use_cache and (scanned or stale):
        merged: dict[str, LeafEntry] = {}
        if within:  # a partial walk: keep the cached rest of the tree as it was
            prefix = "/".join(within)
            merged = {k: v for k, v in cached.items() if not (k == prefix or k.startswith(prefix + "/"))}
        merged.update({e.rel: e for e in entries})
        written = _save_cache(cache_path, merged.values())
        note += f", cache written to {written}" if written else ", cache not written"
    return entries, note
