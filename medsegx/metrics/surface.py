"""Surface-distance metrics: Hausdorff distance (maximum or percentile, e.g. HD95) and
normalised surface Dice (NSD), per batch item, as MONAI defines them.

Definitions (MONAI ``compute_hausdorff_distance`` / ``compute_surface_dice`` with
``use_subvoxels=False``):

* edges of a mask = mask XOR its binary erosion with the face-connected structure
  (scipy's default: 4-connected in 2-D, 6-connected in 3-D), outside the image counting as
  background, so mask pixels on the image border are edges;
* directed distances = for every edge pixel of one mask, the Euclidean distance (in units of
  ``spacing``) to the nearest edge pixel of the other mask;
* HD = max of the two directed maxima; HDp (``percentile=p``) = max of the two directed
  ``np.percentile(..., p)`` values (linear interpolation), e.g. HD95;
* NSD at tolerance t = (#pred-edge distances <= t + #gt-edge distances <= t) / (#pred edges +
  #gt edges), i.e. boundary length counted in edge pixels.

Empty-mask policy (``empty=``):

=====================  ============  ===========================  ===============
policy                 both empty    pred empty, gt not           gt empty, pred not
=====================  ============  ===========================  ===============
HD ``"monai"``         NaN           inf (percentile: NaN)        inf (percentile: NaN)
HD ``"published"``     NaN           see below                    NaN
HD ``"nan"``           NaN           NaN                          NaN
NSD ``"monai"``        NaN           0.0                          0.0
NSD ``"published"``    NaN           0.0                          NaN
NSD ``"nan"``          NaN           NaN                          NaN
=====================  ============  ===========================  ===============

``"published"`` reproduces the published MedSegX evaluation: for an empty prediction it
returns the same percentile (the maximum for ``hd``) of the Euclidean distance from every
background pixel of the label to the label's nearest foreground pixel (the whole image, no
edges), instead of inf. The published code ignored pixel spacing there (it always scored in
pixels); here ``spacing`` is applied, which is the same at unit spacing. Where the published
code crashed (empty label) this returns NaN: the caller counts and reports those items.
``"monai"`` is the default of the pure functions; the evaluation passes ``"published"``.
Under ``"monai"`` a one-sided empty item gets inf for the maximum and NaN for a percentile:
MONAI interpolates between infinite distances there, which gives NaN (it returns inf only
when the non-empty mask has a single edge pixel; that corner is not mimicked).

One deliberate difference from the MONAI versions the paper used: very old MONAI squeezed
1-pixel-thick crops before eroding (so a mask confined to one row had "interior" pixels);
here edges always follow the definition above, as current MONAI does.

Speed (why this is ~20x faster than MONAI on a batch of 2-D slices, on one thread): no
distance transform and no per-slice Python work beyond a crop copy. Each item is cropped to
the bounding box of pred | gt and all crops are packed, zero-padded, into one canvas; edges
come from a few boolean shifts of the canvas. Each edge pixel then probes the other mask's
edge pixels at integer offsets taken in increasing physical length (a precomputed "ring"
table, 8 offsets per 64-bit word test), so the first hit is the exact nearest distance. The
few pixels farther away than the table reaches (islands, misses) are resolved exactly with
one k-d tree over the edge pixels of the items concerned (item index as an extra coordinate
farther apart than any distance). Percentiles use one partition per item and reproduce
``np.percentile`` bit for bit.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ._inputs import SpacingLike, as_mask_batch, as_pair, check_policy, spacing_per_item
from ._rings import _PACKED_OFFSETS, _blocks, _packed_rings, _packed_stop, _ring_search  # noqa: F401

logger = logging.getLogger(__name__)

# Ring table size: about this many offsets are probed per edge pixel before the k-d tree
# fallback (2-D: a disc of radius ~10 px at unit spacing; 3-D: a ball of radius ~4.6 voxels).
_RING_OFFSETS = {2: 320, 3: 400}
_RING_MAX_REACH = 32         # never probe farther than this many pixels along an axis
_CANVAS_VOXELS = 1 << 21     # padded voxels per canvas (working set near the L2 cache size)
_CANVAS_WIDTH = 1024         # row length of the 2-D shelf canvas
_COARSE = 8                  # coarse-grid cell side (8 along the last axis = one 64-bit word)


@dataclass(frozen=True)
class EdgeDistances:
    """Directed edge-to-edge distances of a batch, stored flat.

    ``pred_to_gt[off_pred[i]:off_pred[i + 1]]`` are the distances from item i's prediction
    edge pixels to its label's edges (empty when either mask of item i is empty); likewise
    ``gt_to_pred`` with ``off_gt``. ``n_pred_edges`` / ``n_gt_edges`` count edge pixels.
    """
    pred_to_gt: np.ndarray
    off_pred: np.ndarray
    gt_to_pred: np.ndarray
    off_gt: np.ndarray
    n_pred_edges: np.ndarray
    n_gt_edges: np.ndarray

    @property
    def pred_empty(self) -> np.ndarray:
        return self.n_pred_edges == 0

    @property
    def gt_empty(self) -> np.ndarray:
        return self.n_gt_edges == 0

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(pred->gt, gt->pred) distances of item i."""
        return (self.pred_to_gt[self.off_pred[i]:self.off_pred[i + 1]],
                self.gt_to_pred[self.off_gt[i]:self.off_gt[i + 1]])


# ----------------------------------------------------------------------------- edges

_SCRATCH = threading.local()


def _scratch(role: str, shape: tuple[int, ...], zero: bool) -> np.ndarray:
    """A bool work array reused across calls (one per role and thread): fresh multi-megabyte
    arrays page-fault on first touch on every call, a measurable share of a batch's time.
    Arrays larger than two canvases are not kept."""
    n = int(np.prod(shape))
    if n > 2 * _CANVAS_VOXELS:
        return np.zeros(shape, bool) if zero else np.empty(shape, bool)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(role)
    if buf is None or buf.size < n:
        buf = bufs[role] = np.empty(n, dtype=bool)
    out = buf[:n].reshape(shape)
    if zero:
        out.fill(False)
    return out


def _edges(m: np.ndarray, first_axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """Edges of a bool array along axes ``first_axis..``; the first and last index of each of
    those axes must be 0 (padding), which makes "outside = background" hold there."""
    nd = m.ndim
    axes = range(first_axis, nd)
    core = tuple(slice(1, -1) if ax in axes else slice(None) for ax in range(nd))

    def shifted(ax: int, step: int) -> tuple:
        return tuple(slice(1 + step, m.shape[ax] - 1 + step) if a == ax else core[a] for a in range(nd))

    # interior = pixel and its 2 face neighbours on every axis; edges = pixel and not interior
    first, *rest = [(ax, step) for ax in axes for step in (-1, 1)]
    inner = np.logical_and(m[shifted(*first)], m[shifted(*rest[0])],
                           out=None if out is None else _scratch("inner", m[core].shape, zero=False))
    for ax, step in rest[1:]:
        inner &= m[shifted(ax, step)]
    if out is None:
        out = np.empty_like(m)
    np.greater(m[core], inner, out=out[core])  # bools: a > b is a AND NOT b
    for ax in axes:  # the padding frame is never an edge
        out[tuple(0 if a == ax else slice(None) for a in range(nd))] = False
        out[tuple(-1 if a == ax else slice(None) for a in range(nd))] = False
    return out


def mask_edges(masks: Any, spatial_dims: int | None = None) -> np.ndarray:
    """Edge pixels of each mask (mask XOR erosion, outside = background) -> bool, same shape.

    Args:
        masks: binary masks ``B x [1 x] H x W`` or ``B x [1 x] D x H x W`` (numpy or torch).
    Returns:
        bool array ``B x *spatial`` (channel squeezed).
    """
    m = as_mask_batch(masks, "masks", spatial_dims)
    padded = np.pad(m, [(0, 0)] + [(1, 1)] * (m.ndim - 1))
    inner = tuple([slice(None)] + [slice(1, -1)] * (m.ndim - 1))
    return np.ascontiguousarray(_edges(padded, 1)[inner])


# ----------------------------------------------------------------------------- ring table

@functools.lru_cache(maxsize=64)
def _ring(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer offsets sorted by physical length, their lengths, and the per-axis reach.

    The table holds every offset up to a radius, so the first offset (in this order) at which
    a query finds a feature gives the exact nearest distance. After the zero offset the table
    is padded to whole blocks of 8 by repeating its last entry (harmless: same length).
    """
    s = np.asarray(spacing, dtype=np.float64)
    nd = s.size
    target = _RING_OFFSETS[nd]
    vol = float(np.prod(s))
    radius = math.sqrt(target * vol / math.pi) if nd == 2 else (target * vol * 3 / (4 * math.pi)) ** (1 / 3)
    radius = min(radius, float(np.min(_RING_MAX_REACH * s)))
    radius = max(radius, float(np.min(s)))  # always reach the face neighbours of the finest axis
    reach = np.floor(radius / s + 1e-9).astype(np.int64)
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offs = np.stack([gr.reshape(-1) for gr in grids], axis=1)
    dist = _lengths(offs, s)
    keep = dist <= radius
    offs, dist = offs[keep], dist[keep]
    order = np.lexsort(tuple(offs.T[::-1]) + (dist,))  # by length, ties in a fixed order
    offs, dist = offs[order], dist[order]
    fill = (-(offs.shape[0] - 1)) % 8
    offs = np.concatenate([offs, np.repeat(offs[-1:], fill, axis=0)])
    dist = np.concatenate([dist, np.repeat(dist[-1:], fill)])
    return offs, dist, reach


def _lengths(offs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Physical length of integer offsets ``N x nd``: sqrt(sum((o_k * s_k)^2)), the formula of
    scipy's distance transform with sampling."""
    d2 = np.zeros(offs.shape[0])
    for k in range(offs.shape[1]):
        d2 += (offs[:, k] * s[k]) ** 2
    return np.sqrt(d2)


# ----------------------------------------------------------------------------- packing

def _bounding_boxes(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item bounding box of ``p | g``: (lo, hi exclusive, non-empty), ``B x nd``."""
    b, spatial = p.shape[0], p.shape[1:]
    nd = len(spatial)
    if spatial[-1] % 64 == 0:
        # pack 8 pixels a byte (one fast pass per mask), then work on 64-pixel words:
        # numpy's reductions over short last axes are slow, elementwise ORs are not
        packed = np.packbits(p.reshape(-1))
        packed |= np.packbits(g.reshape(-1))
        words = packed.view(np.uint64).reshape(b, *spatial[:-1], spatial[-1] // 64)
        rows = words[..., 0].copy()
        for j in range(1, words.shape[-1]):
            rows |= words[..., j]
        rows = rows != 0
        per_axis = [rows.any(axis=tuple(1 + j for j in range(nd - 1) if j != k)) for k in range(nd - 1)]
        cols = np.bitwise_or.reduce(words, axis=tuple(range(1, nd)))
        per_axis.append(np.unpackbits(cols.view(np.uint8), axis=-1).astype(bool))
    else:
        packed = np.packbits(p.reshape(-1))
        packed |= np.packbits(g.reshape(-1))
        occupied = np.flatnonzero(packed)
        if occupied.size * 8 <= packed.size:
            return _sparse_bounding_boxes(packed, occupied, b, spatial)
        per_axis = []
        for k in range(nd):
            others = tuple(1 + j for j in range(nd) if j != k)
            per_axis.append(p.any(axis=others) | g.any(axis=others))
    nonempty = per_axis[0].any(axis=1)
    lo = np.stack([o.argmax(axis=1) for o in per_axis], axis=1)
    hi = np.stack([o.shape[1] - o[:, ::-1].argmax(axis=1) for o in per_axis], axis=1)
    return lo.astype(np.int64), hi.astype(np.int64), nonempty


def _sparse_bounding_boxes(packed: np.ndarray, occupied: np.ndarray, b: int,
                           spatial: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bounding_boxes` from the packed ``p | g`` (8 voxels a byte, first voxel in the high
    bit) and its non-zero bytes, when few are (volumes: organs fill a small part): the
    coordinates of the foreground voxels, their minimum and maximum per item."""
    byte, bit = np.nonzero(np.unpackbits(packed[occupied]).reshape(-1, 8))
    voxel = occupied[byte] * 8 + bit  # increasing, so each item's voxels are one run
    item, rest = np.divmod(voxel, int(np.prod(spatial)))
    starts = np.searchsorted(item, np.arange(b))
    nonempty = np.diff(np.append(starts, item.size)) > 0
    lo = np.zeros((b, len(spatial)), np.int64)
    hi = np.zeros((b, len(spatial)), np.int64)
    if nonempty.any():
        first = starts[nonempty]
        for k, c in enumerate(np.unravel_index(rest, spatial)):
            lo[nonempty, k] = np.minimum.reduceat(c, first)
            hi[nonempty, k] = np.maximum.reduceat(c, first) + 1
    return lo, hi, nonempty


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


class _Canvas:
    """The cropped items of a batch packed into one zero-padded array.

    Every item gets ``pad >= reach`` zero pixels before it on each axis and the array ends in
    zeros, so any probe ``pixel + offset`` (offset within the ring) of an item's pixel lands in
    that item or in zeros, even where the flat index wraps to the next row: items never see
    each other and the ring needs no bounds checks. Items go on shelves in the plane of the
    last two axes (tallest first); 3-D items also share the canvas depth, so a canvas holds
    items of similar depth (see :func:`_canvas_groups`). (Stacking 3-D items along depth
    instead made every item as wide as the widest: ~3x the voxels on a CT's organs.)
    """

    def __init__(self, p: np.ndarray, g: np.ndarray, items: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 pad: np.ndarray) -> None:
        nd = p.ndim - 1
        size = hi[items] - lo[items]
        ext = size + pad
        pos = np.zeros_like(size)
        itype = np.int16 if len(items) < 2**15 else np.int32
        if nd == 2:
            width = _round_up(max(_CANVAS_WIDTH, int(ext[:, -1].max()) + 1), _COARSE)
        else:  # a few large items must not sit in a mostly empty plane: about square shelves
            area = int(np.sum(ext[:, -2] * ext[:, -1]))
            width = _round_up(max(int(ext[:, -1].max()) + 1, math.isqrt(area) + 1), _COARSE)
        x = y = shelf = 0
        shelf_of = np.zeros(len(items), np.int64)
        shelf_rows = []  # (first row, rows) of each shelf
        for j in np.argsort(-ext[:, -2], kind="stable"):  # tallest first: little shelf waste
            if x + ext[j, -1] > width - 1:  # the last column stays zero
                shelf_rows.append((y, shelf))
                y, x, shelf = y + shelf, 0, 0
            pos[j, -2:] = (y + pad[-2], x + pad[-1])
            shelf_of[j] = len(shelf_rows)
            x += int(ext[j, -1])
            shelf = max(shelf, int(ext[j, -2]))
        shelf_rows.append((y, shelf))
        shape = (_round_up(y + shelf + int(pad[-2]) + 1, _COARSE), width)
        if nd == 3:
            pos[:, 0] = pad[0]
            shape = (_round_up(int(ext[:, 0].max()) + int(pad[0]) + 1, _COARSE),) + shape
        # which item a pixel belongs to: shelf of its row (in the plane), then item of its column there
        self._shelf_of_row = np.zeros(shape[-2], np.int64)
        for k, (y0, rows) in enumerate(shelf_rows):
            self._shelf_of_row[y0:y0 + rows] = k
        self._item_of_col = np.full((len(shelf_rows), width), -1, itype)
        for j in range(len(items)):
            self._item_of_col[shelf_of[j], pos[j, -1]:pos[j, -1] + size[j, -1]] = j
        self.shape = shape
        self.items = items
        cp = _scratch("pred", shape, zero=True)
        cg = _scratch("gt", shape, zero=True)
        if nd == 2:  # the common case, without generic tuple building (a few µs per item)
            for i, y, x, h, w in zip(items.tolist(), pos[:, 0].tolist(), pos[:, 1].tolist(),
                                     size[:, 0].tolist(), size[:, 1].tolist(), strict=True):
                y0, x0 = int(lo[i, 0]), int(lo[i, 1])
                cp[y:y + h, x:x + w] = p[i, y0:y0 + h, x0:x0 + w]
                cg[y:y + h, x:x + w] = g[i, y0:y0 + h, x0:x0 + w]
        else:
            for j, i in enumerate(items):
                dst = tuple(slice(int(pos[j, k]), int(pos[j, k] + size[j, k])) for k in range(nd))
                src = (int(i),) + tuple(slice(int(lo[i, k]), int(hi[i, k])) for k in range(nd))
                cp[dst] = p[src]
                cg[dst] = g[src]
        self.edges_p = _edges(cp, 0, out=_scratch("pred_edges", shape, zero=False))
        self.edges_g = _edges(cg, 0, out=_scratch("gt_edges", shape, zero=False))
        self.idx_p = np.flatnonzero(self.edges_p)
        self.idx_g = np.flatnonzero(self.edges_g)
        self.item_p = self._item_of(self.idx_p)
        self.item_g = self._item_of(self.idx_g)
        self.n_p = np.bincount(self.item_p, minlength=len(items))
        self.n_g = np.bincount(self.item_g, minlength=len(items))

    def _item_of(self, idx: np.ndarray) -> np.ndarray:
        """Canvas item index of flat indices that lie inside items (int64)."""
        rows, width = self.shape[-2:]
        if len(self.shape) == 3:
            idx = idx % (rows * width)  # the plane: items keep their place at every depth
        row = idx // width
        return self._item_of_col[self._shelf_of_row[row], idx - row * width].astype(np.int64)

    def near_fn(self, edges: np.ndarray, reach: np.ndarray):
        """Coarse test: may a feature lie within ``reach`` pixels (per axis) of a query?"""
        cells = None

        def near(q: np.ndarray) -> np.ndarray:
            nonlocal cells
            if cells is None:
                w = edges.view(np.uint64)  # last axis: one word = 8 pixels = one coarse cell
                split = []
                for n in w.shape[:-1]:
                    split += [n // _COARSE, _COARSE]
                occ = w.reshape(*split, w.shape[-1]).any(axis=tuple(range(1, 2 * (w.ndim - 1), 2)))
                m = -(-reach // _COARSE)
                cells = ndimage.maximum_filter(occ.view(np.uint8), size=tuple(2 * m + 1), mode="constant")
            coords = np.unravel_index(q, self.shape)
            return cells[tuple(c // _COARSE for c in coords)] > 0

        return near


def _canvas_groups(items: np.ndarray, ext: np.ndarray) -> list[np.ndarray]:
    """Runs of items whose padded crops (``ext``: items x axes) fit one canvas.

    3-D items share a canvas depth: they are taken deepest first, and a canvas holds the
    items whose footprints times the first (deepest) one's depth fit.
    """
    if ext.shape[1] == 3:
        order = np.argsort(-ext[:, 0], kind="stable")
        items, ext = items[order], ext[order]
    area = ext[:, -2] * ext[:, -1]
    groups, start, total = [], 0, 0
    for k in range(items.size):
        depth = int(ext[start, 0]) if ext.shape[1] == 3 else 1
        if k > start and ((total + int(area[k])) * depth > _CANVAS_VOXELS or k - start >= 2**15 - 1):
            groups.append(items[start:k])
            start, total = k, 0
        total += int(area[k])
    groups.append(items[start:])
    return groups


# ----------------------------------------------------------------------------- distances

def _exact_nearest(cv: _Canvas, q: np.ndarray, q_item: np.ndarray, feat_idx: np.ndarray,
                   feat_item: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Exact nearest same-item feature distance for flat query indices: one k-d tree over the
    features of the items concerned, the item index as an extra coordinate spaced farther
    apart than any in-item distance (each item has features), so no query crosses items."""
    involved = np.zeros(len(cv.items), bool)
    involved[q_item] = True
    keep = involved[feat_item]
    f, f_item = feat_idx[keep], feat_item[keep]
    far = 2.0 * math.sqrt(float(np.sum((np.asarray(cv.shape) * s) ** 2))) + 1.0

    def coords(idx: np.ndarray, item: np.ndarray) -> np.ndarray:
        c = np.unravel_index(idx, cv.shape)
        return np.column_stack([item * far] + [c[k] * s[k] for k in range(len(c))])

    # an unbalanced tree with larger leaves builds ~2x faster and queries as fast here
    tree = cKDTree(coords(f, f_item), leafsize=32, balanced_tree=False, compact_nodes=False)
    return tree.query(coords(q, q_item), k=1)[0]


def _directed(cv: _Canvas, q: np.ndarray, q_item: np.ndarray, feat_edges: np.ndarray,
              feat_idx: np.ndarray, feat_item: np.ndarray, both: np.ndarray, s: np.ndarray,
              flat_off: np.ndarray, dist: np.ndarray, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances from query edge pixels to the nearest feature edge pixel of the same item.

    Returns (distances, canvas item index) for the queries of items where both masks exist.
    """
    keep = both[q_item]
    q, q_item = q[keep], q_item[keep]
    d, unresolved = _ring_search(q, feat_edges.reshape(-1), flat_off, dist, cv.near_fn(feat_edges, reach))
    if unresolved.size:
        d[unresolved] = _exact_nearest(cv, q[unresolved], q_item[unresolved], feat_idx, feat_item, s)
    return d, q_item


def _group(values: list[np.ndarray], items: list[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Values tagged with their batch item -> (values grouped by item, offsets ``B+1``)."""
    if not values:
        return np.zeros(0), np.zeros(batch + 1, np.int64)
    v = np.concatenate(values)
    it = np.concatenate(items)
    # a stable sort of 16-bit keys is a radix sort: linear time
    key = it.astype(np.int16) if batch < 2**15 else it
    order = np.argsort(key, kind="stable")
    off = np.concatenate([[0], np.cumsum(np.bincount(it, minlength=batch))]).astype(np.int64)
    return v[order], off


def _distances(p: np.ndarray, g: np.ndarray, spacing: np.ndarray) -> EdgeDistances:
    batch = p.shape[0]
    lo, hi, nonempty = _bounding_boxes(p, g)
    n_pred = np.zeros(batch, np.int64)
    n_gt = np.zeros(batch, np.int64)
    d_pg, i_pg, d_gp, i_gp = [], [], [], []
    uniq, inverse = np.unique(spacing, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for u, s in enumerate(uniq):
        items = np.flatnonzero((inverse == u) & nonempty)
        if items.size == 0:
            continue
        offs, dist, reach = _ring(tuple(float(v) for v in s))
        pad = np.maximum(reach, 1)
        for group in _canvas_groups(items, hi[items] - lo[items] + pad):
            cv = _Canvas(p, g, group, lo, hi, pad)
            n_pred[group] = cv.n_p
            n_gt[group] = cv.n_g
            both = (cv.n_p > 0) & (cv.n_g > 0)
            strides = np.array([int(np.prod(cv.shape[k + 1:])) for k in range(len(cv.shape))], dtype=np.int64)
            flat_off = offs @ strides
            ring = (s, flat_off, dist, reach)
            d, it = _directed(cv, cv.idx_p, cv.item_p, cv.edges_g, cv.idx_g, cv.item_g, both, *ring)
            d_pg.append(d)
            i_pg.append(group[it])
            d, it = _directed(cv, cv.idx_g, cv.item_g, cv.edges_p, cv.idx_p, cv.item_p, both, *ring)
            d_gp.append(d)
            i_gp.append(group[it])
    pred_to_gt, off_pred = _group(d_pg, i_pg, batch)
    gt_to_pred, off_gt = _group(d_gp, i_gp, batch)
    return EdgeDistances(pred_to_gt, off_pred, gt_to_pred, off_gt, n_pred, n_gt)


def edge_distances(pred: Any, gt: Any, spacing: SpacingLike = None,
                   spatial_dims: int | None = None) -> EdgeDistances:
    """Directed edge-to-edge Euclidean distances of every item (see :class:`EdgeDistances`).

    Args:
        pred, gt: binary masks ``B x [1 x] H x W`` or ``B x [1 x] D x H x W``.
        spacing: None (1), a scalar, one value per spatial axis, or ``B x ndim``.
    """
    p, g = as_pair(pred, gt, spacing, spatial_dims)
    s = spacing_per_item(spacing, p.shape[0], p.ndim - 1)
    return _distances(p, g, s)


# ----------------------------------------------------------------------------- reductions

def _percentile_linear(seg: np.ndarray, q: float) -> float:
    """``np.percentile(seg, q)`` (method "linear"), bit for bit, via one partition."""
    n = seg.size
    vi = (n - 1) * (np.float64(q) / 100)
    lo = math.floor(vi)
    if vi >= n - 1:
        return float(seg.max())
    part = np.partition(seg, (lo, lo + 1))
    a, b = part[lo], part[lo + 1]
    t = vi - lo
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end for accuracy
    return float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t)


def _directed_summary(d: np.ndarray, off: np.ndarray, percentile: float | None) -> np.ndarray:
    n_items = off.size - 1
    out = np.full(n_items, np.nan)
    counts = np.diff(off)
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size == 0:
        return out
    if percentile is None:
        out[nonempty] = np.maximum.reduceat(d, off[nonempty])
        return out
    for i in nonempty:
        out[i] = _percentile_linear(d[off[i]:off[i + 1]], percentile)
    return out


def _empty_prediction_value(gt_item: np.ndarray, s: np.ndarray, percentile: float | None) -> float:
    """Published fallback: percentile of distance-to-label over the label's background."""
    background = ~gt_item
    if not background.any():
        return float("nan")
    dmap = ndimage.distance_transform_edt(background, sampling=s)[background]
    return float(dmap.max()) if percentile is None else float(np.percentile(dmap, percentile))


def hausdorff_distance(pred: Any, gt: Any, percentile: float | None = None, spacing: SpacingLike = None,
                       directed: bool = False, empty: str = "monai",
                       spatial_dims: int | None = None) -> np.ndarray:
    """Hausdorff distance per item: max (``percentile=None``) or a percentile of edge distances.

    Args:
        pred, gt: binary masks ``B x [1 x] H x W`` or ``B x [1 x] D x H x W`` (numpy or torch).
        percentile: e.g. 95 for HD95 (np.percentile, linear); None for the maximum.
        spacing: pixel size per axis (None = 1, distances in pixels); see :func:`edge_distances`.
        directed: only the pred -> gt direction.
        empty: empty-mask policy, see the module docstring.
    Returns:
        float64 array ``B``.
    """
    check_policy(empty)
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {percentile}")
    p, g = as_pair(pred, gt, spacing, spatial_dims)
    s = spacing_per_item(spacing, p.shape[0], p.ndim - 1)
    ed = _distances(p, g, s)
    out = _directed_summary(ed.pred_to_gt, ed.off_pred, percentile)
    if not directed:
        out = np.fmax(out, _directed_summary(ed.gt_to_pred, ed.off_gt, percentile))
    pe, ge = ed.pred_empty, ed.gt_empty
    if np.any(pe | ge):
        logger.debug("hausdorff: %d empty prediction(s), %d empty label(s) (policy %r)",
                     int(pe.sum()), int(ge.sum()), empty)
        out[pe & ge] = np.nan
        if empty == "monai":
            out[pe ^ ge] = np.inf if percentile is None else np.nan
        elif empty == "nan":
            out[pe | ge] = np.nan
        else:  # published
            out[ge] = np.nan
            for i in np.flatnonzero(pe & ~ge):
                out[i] = _empty_prediction_value(g[i], s[i], percentile)
    return out


def hd95(pred: Any, gt: Any, spacing: SpacingLike = None, empty: str = "monai",
         spatial_dims: int | None = None) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance per item (MONAI ``percentile=95``) -> ``B``."""
    return hausdorff_distance(pred, gt, 95, spacing, empty=empty, spatial_dims=spatial_dims)


def hd(pred: Any, gt: Any, spacing: SpacingLike = None, empty: str = "monai",
       spatial_dims: int | None = None) -> np.ndarray:
    """Symmetric (maximum) Hausdorff distance per item -> ``B``."""
    return hausdorff_distance(pred, gt, None, spacing, empty=empty, spatial_dims=spatial_dims)


def nsd(pred: Any, gt: Any, tolerance: float, spacing: SpacingLike = None, empty: str = "monai",
        spatial_dims: int | None = None) -> np.ndarray:
    """Normalised surface Dice at ``tolerance`` (same unit as ``spacing``) per item -> ``B``.

    MONAI ``compute_surface_dice(use_subvoxels=False)``: the fraction of edge pixels of both
    masks lying within ``tolerance`` of the other mask's edges. (DeepMind's
    ``surface-distance`` weighs edges by surfel area instead: not the same numbers.)
    """
    check_policy(empty)
    tol = float(tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    p, g = as_pair(pred, gt, spacing, spatial_dims)
    s = spacing_per_item(spacing, p.shape[0], p.ndim - 1)
    ed = _distances(p, g, s)
    close = np.concatenate([[0], np.cumsum(ed.pred_to_gt <= tol)])
    close_g = np.concatenate([[0], np.cumsum(ed.gt_to_pred <= tol)])
    good = np.diff(close[ed.off_pred]) + np.diff(close_g[ed.off_gt])
    total = ed.n_pred_edges + ed.n_gt_edges
    with np.errstate(invalid="ignore", divide="ignore"):
        out = good / np.where(total > 0, total, 1).astype(np.float64)
    pe, ge = ed.pred_empty, ed.gt_empty
    out[pe ^ ge] = 0.0
    out[pe & ge] = np.nan
    if empty == "nan":
        out[pe | ge] = np.nan
    elif empty == "published":
        out[ge] = np.nan
    return out


__all__ = ["EdgeDistances", "edge_distances", "hausdorff_distance", "hd", "hd95", "mask_edges", "nsd"]
