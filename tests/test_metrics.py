"""medsegx.metrics against MONAI, an independent scipy reference, and hand-computed cases."""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsegx.metrics import (
    LABEL_FREE_MODES,
    agreement_scores,
    binarize,
    choose,
    dice,
    edge_distances,
    hausdorff_distance,
    hd,
    hd95,
    mask_edges,
    nsd,
    overlap_counts,
    score_multimask,
    select_masks,
    stability_scores,
)
from medsegx.metrics.surface import _percentile_linear, _ring

monai_metrics = pytest.importorskip("monai.metrics")


# ----------------------------------------------------------------------------- data

def _blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [rng.uniform(-0.1 * n, 1.1 * n) for n in shape]  # sometimes cut by the border
    radii = [rng.uniform(1, 0.3 * n) for n in shape]
    r = sum(((gr - c) / rr) ** 2 for gr, c, rr in zip(grids, centre, radii, strict=True))
    wobble = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * rng.uniform(0, 6)
    return r + wobble < 1


def random_pairs(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob pairs with shifts, dilations, salt noise, islands, thin shapes; no empty mask."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((n, *shape), bool)
    gts = np.zeros((n, *shape), bool)
    for i in range(n):
        g = _blob(rng, shape)
        if not g.any():
            g[tuple(int(rng.integers(0, s)) for s in shape)] = True
        kind = i % 6
        if kind == 0:
            p = _blob(rng, shape)  # unrelated: far distances, k-d tree fallback
        elif kind == 1:
            p = np.roll(g, tuple(int(v) for v in rng.integers(-5, 6, len(shape))), axis=tuple(range(len(shape))))
            it = int(rng.integers(1, 3))
            p = ndimage.binary_dilation(p, iterations=it) if rng.random() < 0.5 else ndimage.binary_erosion(p)
        elif kind == 2:
            p = g ^ (rng.random(shape) < 0.003)  # salt noise, holes
        elif kind == 3:
            p = g.copy()
            p[tuple(int(rng.integers(0, s)) for s in shape)] = True  # a far single pixel
        elif kind == 4:
            p = np.zeros(shape, bool)  # a thin line
            sl = [slice(None)] * len(shape)
            sl[0] = int(rng.integers(0, shape[0]))
            p[tuple(sl)] = True
        else:
            p = g.copy()
        if not p.any():
            p = g.copy()
        preds[i], gts[i] = p, g
    return preds, gts


# ----------------------------------------------------------------------------- references

@contextlib.contextmanager
def _quiet_one_thread():
    """MONAI per-slice calls: one torch thread (many small ops contend badly) and no warnings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)


def monai_hausdorff(p, g, percentile=None, spacing=None):
    with _quiet_one_thread():
        out = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(p[:, None]), torch.from_numpy(g[:, None]), include_background=True,
            percentile=percentile, spacing=spacing)
    return out.numpy()[:, 0].astype(np.float64)


def monai_nsd(p, g, tol, spacing=None):
    with _quiet_one_thread():
        out = monai_metrics.compute_surface_dice(
            torch.from_numpy(p[:, None]).float(), torch.from_numpy(g[:, None]).float(), [tol],
            include_background=True, spacing=spacing)
    return out.numpy()[:, 0].astype(np.float64)


def scipy_distances(p: np.ndarray, g: np.ndarray, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Independent exact reference for one item: scipy erosion + full EDT."""
    ep = p ^ ndimage.binary_erosion(p)
    eg = g ^ ndimage.binary_erosion(g)
    return (ndimage.distance_transform_edt(~eg, sampling=spacing)[ep],
            ndimage.distance_transform_edt(~ep, sampling=spacing)[eg])


# ----------------------------------------------------------------------------- against MONAI

@pytest.fixture(scope="module")
def pairs_2d():
    return random_pairs(240, (256, 256), seed=1)


def test_hd95_hd_match_monai_2d(pairs_2d):
    p, g = pairs_2d
    ours = hd95(p, g)
    ref = monai_hausdorff(p, g, percentile=95)
    # MONAI interpolates in float32 (torch.quantile); ours is np.percentile in float64
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hd(p, g), monai_hausdorff(p, g), rtol=1e-6, atol=1e-5)


def test_nsd_matches_monai_2d(pairs_2d):
    p, g = pairs_2d[0][:120], pairs_2d[1][:120]
    for tol in (0.0, 1.0, 2.0, 5.5):
        np.testing.assert_allclose(nsd(p, g, tol), monai_nsd(p, g, tol), rtol=1e-6, atol=1e-6)


def test_dice_matches_monai(pairs_2d):
    p, g = pairs_2d
    with _quiet_one_thread():
        ref = monai_metrics.compute_dice(torch.from_numpy(p[:, None]).float(), torch.from_numpy(g[:, None]).float(),
                                         include_background=True).numpy()[:, 0]
    np.testing.assert_allclose(dice(p, g), ref, rtol=1e-6, atol=1e-7)


def test_anisotropic_2d_matches_monai(pairs_2d):
    p, g = pairs_2d[0][:60], pairs_2d[1][:60]
    spacing = (0.7, 1.9)
    np.testing.assert_allclose(hd95(p, g, spacing=spacing), monai_hausdorff(p, g, 95, spacing), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nsd(p, g, 2.5, spacing=spacing), monai_nsd(p, g, 2.5, spacing), atol=1e-6)


def test_3d_anisotropic_matches_monai():
    p, g = random_pairs(12, (20, 40, 36), seed=2)
    spacing = (2.5, 0.8, 0.6)
    np.testing.assert_allclose(hd95(p, g, spacing=spacing), monai_hausdorff(p, g, 95, spacing), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hd(p, g, spacing=spacing), monai_hausdorff(p, g, None, spacing), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(nsd(p, g, 1.5, spacing=spacing), monai_nsd(p, g, 1.5, spacing), atol=1e-6)
    # B x 1 x D x H x W is the same batch
    np.testing.assert_array_equal(hd95(p[:, None], g[:, None], spacing=spacing), hd95(p, g, spacing=spacing))


def test_per_item_spacing_3d():
    p, g = random_pairs(6, (10, 24, 24), seed=3)
    spacing = np.array([[1.0, 1.0, 1.0], [3.0, 0.5, 0.5], [1.0, 1.0, 1.0], [0.4, 2.0, 1.1], [2.0, 2.0, 2.0],
                        [3.0, 0.5, 0.5]])
    ours = hd95(p, g, spacing=spacing)
    for i in range(len(p)):
        np.testing.assert_allclose(ours[i], hd95(p[i:i + 1], g[i:i + 1], spacing=spacing[i])[0], rtol=0, atol=0)
    ref = monai_hausdorff(p, g, 95, [list(s) for s in spacing])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _organ_volumes(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Organ-like 3-D pairs of very different sizes and depths (a CT's labels): small and large
    blobs, thin slabs, boundary noise, shifts, islands, a miss; no empty mask."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(k) for k in shape], indexing="ij")
    preds, gts = np.zeros((n, *shape), bool), np.zeros((n, *shape), bool)
    for i in range(n):
        centre = [rng.uniform(0.2 * k, 0.8 * k) for k in shape]
        radii = [rng.uniform(1.0, 0.45 * k) * (0.3 if i % 5 == 0 and a == 0 else 1.0) for a, k in enumerate(shape)]
        r = sum(((gr - c) / rr) ** 2 for gr, c, rr in zip(grids, centre, radii, strict=True))
        g = r < 1
        if not g.any():
            g[tuple(int(c) for c in centre)] = True
        noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
        p = r + noise * rng.uniform(0, 1.5) / (noise.std() + 1e-9) * 0.3 < 1
        p = np.roll(p, tuple(int(v) for v in rng.integers(-1, 2, 3)), axis=(0, 1, 2))
        if i % 7 == 3:  # a false-positive island
            p[tuple(int(rng.integers(0, k)) for k in shape)] = True
        if i % 11 == 5:  # a miss: the prediction is elsewhere
            p = np.roll(g, (0, shape[1] // 2, shape[2] // 2), axis=(0, 1, 2))
        if not p.any():
            p = g.copy()
        preds[i], gts[i] = p, g
    return preds, gts


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (2.5, 0.7, 0.9), None])
def test_3d_organ_volumes_match_monai(spacing):
    """Volumes as a CT's organs (items of very different sizes and depths, width not a multiple of 64):
    HD95, HD and NSD equal MONAI's (the canvases pack items by depth, the bounding boxes come from
    the sparse foreground)."""
    p, g = _organ_volumes(23, (18, 37, 45), seed=11)
    monai_spacing = list(spacing) if spacing is not None else None
    np.testing.assert_allclose(hd95(p, g, spacing=spacing), monai_hausdorff(p, g, 95, monai_spacing),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hd(p, g, spacing=spacing), monai_hausdorff(p, g, None, monai_spacing),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(nsd(p, g, 2.0, spacing=spacing), monai_nsd(p, g, 2.0, monai_spacing), atol=1e-6)


def test_3d_many_canvases_exact(monkeypatch):
    """Items spread over many canvases (a small canvas budget): distances still exact (scipy EDT)."""
    import medsegx.metrics.surface as surface

    p, g = _organ_volumes(9, (14, 30, 27), seed=12)
    spacing = (2.0, 0.8, 1.1)
    whole = edge_distances(p, g, spacing=spacing)
    monkeypatch.setattr(surface, "_CANVAS_VOXELS", 4000)
    split = edge_distances(p, g, spacing=spacing)
    for i in range(len(p)):
        ref_pg, ref_gp = scipy_distances(p[i], g[i], spacing)
        for ed in (whole, split):
            np.testing.assert_allclose(np.sort(ed.item(i)[0]), np.sort(ref_pg), rtol=1e-12)
            np.testing.assert_allclose(np.sort(ed.item(i)[1]), np.sort(ref_gp), rtol=1e-12)


def test_bounding_boxes_dense_and_sparse():
    """The bounding boxes of p | g, from the dense reductions and from the sparse foreground."""
    from medsegx.metrics.surface import _bounding_boxes

    rng = np.random.default_rng(13)
    for shape in [(5, 7, 9, 13), (3, 4, 50), (6, 3, 5, 66), (4, 12, 64), (2, 1, 1, 1)]:
        for density in (0.0, 0.002, 0.05, 0.6):
            p = rng.random(shape) < density
            g = rng.random(shape) < density / 2
            p[0] = g[0] = False
            lo, hi, nonempty = _bounding_boxes(p, g)
            for i, m in enumerate(p | g):
                where = np.nonzero(m)
                assert nonempty[i] == (where[0].size > 0)
                if nonempty[i]:
                    assert lo[i].tolist() == [int(w.min()) for w in where]
                    assert hi[i].tolist() == [int(w.max()) + 1 for w in where]


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (0.3, 2.7), (0.1, 5.0)])
def test_edge_distances_exact_against_scipy(spacing):
    p, g = random_pairs(36, (96, 80), seed=4)
    ed = edge_distances(p, g, spacing=spacing)
    for i in range(len(p)):
        ours_pg, ours_gp = ed.item(i)
        ref_pg, ref_gp = scipy_distances(p[i], g[i], spacing)
        np.testing.assert_allclose(np.sort(ours_pg), np.sort(ref_pg), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.sort(ours_gp), np.sort(ref_gp), rtol=1e-12, atol=1e-12)


def test_edge_distances_exact_3d():
    p, g = random_pairs(8, (12, 30, 26), seed=5)
    spacing = (3.0, 0.7, 0.9)
    ed = edge_distances(p, g, spacing=spacing)
    for i in range(len(p)):
        ref_pg, ref_gp = scipy_distances(p[i], g[i], spacing)
        np.testing.assert_allclose(np.sort(ed.item(i)[0]), np.sort(ref_pg), rtol=1e-12)
        np.testing.assert_allclose(np.sort(ed.item(i)[1]), np.sort(ref_gp), rtol=1e-12)


def test_far_points_use_exact_fallback():
    """Distances far beyond the probe ring (k-d tree path) and many items in one call."""
    p = np.zeros((3, 256, 256), bool)
    g = np.zeros((3, 256, 256), bool)
    g[:, 10:20, 10:20] = True
    p[0, 240, 250] = True
    p[1, 10:20, 10:20] = True
    p[1, 200:203, 3] = True
    p[2] = g[2]
    ours = hd(p, g)
    ref = [max(d.max(), e.max()) for d, e in (scipy_distances(p[i], g[i]) for i in range(3))]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[0] == pytest.approx(math.hypot(240 - 10, 250 - 10))
    assert ours[2] == 0.0


def test_percentile_is_numpy_percentile_bit_for_bit():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 20, 21, 100, 1001]:
        for _ in range(20):
            x = np.round(rng.exponential(5, n), int(rng.integers(0, 4)))
            for q in (95, 50, 0, 100, 99.9):
                assert _percentile_linear(x, q) == np.percentile(x, q)


def test_mask_edges_match_scipy_and_border():
    p, _ = random_pairs(20, (40, 50), seed=6)
    edges = mask_edges(p)
    for i in range(len(p)):
        np.testing.assert_array_equal(edges[i], p[i] ^ ndimage.binary_erosion(p[i]))
    full = np.ones((1, 5, 6), bool)
    e = mask_edges(full)[0]
    assert e.sum() == 2 * 5 + 2 * 6 - 4 and not e[1:-1, 1:-1].any()  # the border is an edge


def test_ring_table_is_complete_and_sorted():
    for spacing in [(1.0, 1.0), (0.3, 2.7), (3.0, 0.7, 0.9)]:
        offs, dist, reach = _ring(spacing)
        assert np.all(np.diff(dist) >= 0) and dist[0] == 0
        radius = dist[-1]
        grids = np.meshgrid(*[np.arange(-r - 2, r + 3) for r in reach], indexing="ij")
        allo = np.stack([x.reshape(-1) for x in grids], 1)
        alld = np.sqrt(((allo * np.array(spacing)) ** 2).sum(1))
        inside = {tuple(o) for o in allo[alld <= radius]}
        assert inside <= {tuple(o) for o in offs}


# ----------------------------------------------------------------------------- hand-computed

def test_single_pixels():
    p = np.zeros((1, 10, 10), bool)
    g = np.zeros((1, 10, 10), bool)
    p[0, 2, 3] = True
    g[0, 5, 7] = True
    assert hd95(p, g)[0] == 5.0 and hd(p, g)[0] == 5.0
    assert nsd(p, g, 4.9)[0] == 0.0 and nsd(p, g, 5.0)[0] == 1.0
    assert hd95(p, g, spacing=(2.0, 1.0))[0] == pytest.approx(math.sqrt(6**2 + 4**2))
    assert dice(p, g)[0] == 0.0


def test_pixel_and_line_percentile_interpolation():
    p = np.zeros((1, 8, 8), bool)
    g = np.zeros((1, 8, 8), bool)
    p[0, 5, 5] = True
    g[0, 5, 5:8] = True  # gt edges at distances 0, 1, 2 from the pixel
    assert hd95(p, g)[0] == pytest.approx(1.9)  # 1 + 0.9 * (2 - 1)
    assert hd(p, g)[0] == 2.0
    assert hausdorff_distance(p, g, 95, directed=True)[0] == 0.0
    assert nsd(p, g, 1.0)[0] == pytest.approx(3 / 4)
    assert dice(p, g)[0] == pytest.approx(0.5)
    assert hd95(p, g, spacing=(1.0, 0.5))[0] == pytest.approx(0.95)


def test_shifted_square():
    p = np.zeros((1, 32, 32), bool)
    g = np.zeros((1, 32, 32), bool)
    p[0, 10:20, 10:20] = True
    g[0, 10:20, 13:23] = True
    # per direction: 14 zeros, 4 ones, 4 twos, 14 threes (36 edge pixels)
    assert hd(p, g)[0] == 3.0 and hd95(p, g)[0] == 3.0
    assert hausdorff_distance(p, g, 50)[0] == 1.5  # vi = 17.5: between sorted[17] = 1 and [18] = 2
    assert nsd(p, g, 1.0)[0] == pytest.approx(18 / 36)
    assert nsd(p, g, 2.0)[0] == pytest.approx(22 / 36)
    assert dice(p, g)[0] == pytest.approx(0.7)


def test_anisotropic_vertical_line():
    p = np.zeros((1, 9, 9), bool)
    g = np.zeros((1, 9, 9), bool)
    p[0, 1, 4] = True
    g[0, 1:5, 4] = True  # distances 0, 1, 2, 3 rows
    assert hd(p, g, spacing=(2.0, 3.0))[0] == 6.0
    assert hd95(p, g, spacing=(2.0, 3.0))[0] == pytest.approx(2.0 * (2 + 0.85))


# ----------------------------------------------------------------------------- empty masks

def _empty_cases():
    """Items: both empty, pred empty, gt empty, both present."""
    p = np.zeros((4, 1, 6), bool)
    g = np.zeros((4, 1, 6), bool)
    g[1, 0, 0] = True
    p[2, 0, 3] = True
    p[3, 0, 1] = g[3, 0, 1] = True
    return p, g


def test_empty_policy_monai():
    p, g = _empty_cases()
    p[2, 0, 4] = True  # more than one edge pixel (MONAI's percentile of infinities is then NaN)
    out = hd95(p, g)
    assert np.isnan(out[:3]).all() and out[3] == 0.0
    np.testing.assert_array_equal(out, monai_hausdorff(p, g, 95))
    out = hd(p, g)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == np.inf and out[3] == 0.0
    np.testing.assert_array_equal(out, monai_hausdorff(p, g))
    out = nsd(p, g, 1.0)
    assert np.isnan(out[0]) and out[1] == 0.0 and out[2] == 0.0 and out[3] == 1.0
    np.testing.assert_array_equal(out[1:], monai_nsd(p, g, 1.0)[1:])


def test_empty_policy_published_hand_checked():
    p, g = _empty_cases()
    out = hd95(p, g, empty="published")
    # pred empty, label pixel at column 0 of a 1 x 6 image: background distances 1..5;
    # np.percentile([1, 2, 3, 4, 5], 95) = 4 + 0.8 * 1 = 4.8
    assert out[1] == pytest.approx(4.8)
    assert np.isnan(out[0]) and np.isnan(out[2]) and out[3] == 0.0
    assert hd(p, g, empty="published")[1] == 5.0
    assert hd95(p, g, spacing=(1.0, 0.5), empty="published")[1] == pytest.approx(2.4)
    out = nsd(p, g, 1.0, empty="published")
    assert np.isnan(out[0]) and out[1] == 0.0 and np.isnan(out[2])


def test_empty_policy_published_2d_full_check():
    g = np.zeros((1, 5, 5), bool)
    g[0, 2, 2] = True
    p = np.zeros_like(g)
    ref = ndimage.distance_transform_edt(~g[0])[~g[0]]
    assert hd95(p, g, empty="published")[0] == np.percentile(ref, 95)
    full = np.ones((1, 4, 4), bool)
    assert np.isnan(hd95(np.zeros_like(full), full, empty="published")[0])  # no background: NaN


def test_empty_policy_nan_and_dice():
    p, g = _empty_cases()
    assert np.isnan(hd95(p, g, empty="nan")[:3]).all()
    assert np.isnan(nsd(p, g, 1.0, empty="nan")[:3]).all()
    d = dice(p, g)
    assert np.isnan(d[0]) and d[1] == 0.0 and np.isnan(d[2]) and d[3] == 1.0
    d = dice(p, g, empty="score")
    assert d[0] == 1.0 and d[2] == 0.0
    with pytest.raises(ValueError):
        hd95(p, g, empty="zero")


# ----------------------------------------------------------------------------- inputs

def test_inputs_torch_channel_and_validation():
    p, g = random_pairs(6, (32, 32), seed=7)
    ref = hd95(p, g)
    np.testing.assert_array_equal(hd95(torch.from_numpy(p), torch.from_numpy(g)), ref)
    np.testing.assert_array_equal(hd95(p[:, None].astype(np.uint8), g[:, None].astype(np.float32)), ref)
    np.testing.assert_array_equal(dice(torch.from_numpy(p[:, None]), g), dice(p, g))
    counts = overlap_counts(p, g)
    np.testing.assert_array_equal(counts["intersection"], (p & g).sum((1, 2)))
    with pytest.raises(ValueError, match="binary"):
        hd95(p * 0.5, g)
    with pytest.raises(ValueError, match="same shape"):
        dice(p[:, :16], g)
    with pytest.raises(ValueError, match="spacing"):
        hd95(p, g, spacing=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(p, g, -1.0)


def test_odd_sizes_and_border_touching():
    rng = np.random.default_rng(8)
    p = rng.random((5, 17, 13)) < 0.4
    g = rng.random((5, 17, 13)) < 0.4
    np.testing.assert_allclose(hd95(p, g), monai_hausdorff(p, g, 95), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nsd(p, g, 1.0), monai_nsd(p, g, 1.0), atol=1e-6)


# ----------------------------------------------------------------------------- selection

def test_select_masks_modes_and_ties():
    g = np.zeros((3, 1, 16, 16), bool)
    g[:, 0, 4:10, 4:10] = True
    m = np.zeros((3, 3, 16, 16), bool)
    m[0, 0, 4:8, 4:10] = True   # item 0: output 2 best
    m[0, 1, 4:6, 4:10] = True
    m[0, 2, 4:10, 4:10] = True
    m[1, :, 4:9, 4:10] = True   # item 1: three-way tie -> first
    m[2, 1, 4:10, 4:10] = True  # item 2: outputs 1 and 2 tie -> 1
    m[2, 2, 4:10, 4:10] = True
    assert select_masks(m, g, mode="oracle").tolist() == [2, 0, 1]
    iou = torch.tensor([[0.1, 0.9, 0.9], [0.5, 0.2, 0.1], [0.3, 0.3, 0.3]])
    assert select_masks(m, iou_pred=iou, mode="iou").tolist() == [1, 0, 0]
    assert select_masks(m, mode="first").tolist() == [0, 0, 0]
    logits = torch.where(torch.from_numpy(m), 3.0, -3.0)
    assert select_masks(logits, torch.from_numpy(g), mode="oracle").tolist() == [2, 0, 1]
    empty = np.zeros_like(g)
    assert select_masks(m, empty, mode="oracle").tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        select_masks(m, g, mode="best")


def test_stability_score_by_hand():
    logits = np.array([[[[3.0, 0.5, -0.5, -3.0], [2.0, 2.0, -2.0, -2.0]],
                        [[-5.0] * 4, [-5.0] * 4]]], np.float32)  # 1 item, 2 outputs of 2 x 4
    # output 0: 3 pixels above +1, 5 above -1 -> 3/5; output 1 empty even at -1 -> 0
    np.testing.assert_allclose(stability_scores(logits), [[0.6, 0.0]])
    # offset 0.25: 4 above +0.25, the same 4 above -0.25 -> 1
    np.testing.assert_allclose(stability_scores(torch.from_numpy(logits), offset=0.25), [[1.0, 0.0]])
    with pytest.raises(ValueError, match="logits"):
        stability_scores(logits > 0)


def test_agreement_score_by_hand():
    a, b, c = [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]
    masks = np.array([[[a], [b], [c]]], bool)  # 1 item, 3 outputs of 1 x 4
    # IoU(a, b) = 2/3, IoU(a, c) = IoU(b, c) = 0: a and b each agree 1/3 on average, c not at all
    np.testing.assert_allclose(agreement_scores(masks), [[1 / 3, 1 / 3, 0.0]])
    assert choose("agreement", (1, 3), agreement=agreement_scores(masks)).tolist() == [0]  # tie -> first
    np.testing.assert_allclose(agreement_scores(np.zeros((1, 2, 1, 4), bool)), [[1.0, 1.0]])  # both empty agree
    np.testing.assert_allclose(agreement_scores(masks[:, :1]), [[1.0]])


def test_label_free_rules_by_hand():
    iou = np.array([[0.9, 0.8, 0.7], [0.1, 0.9, 0.9], [0.2, 0.9, 0.3], [0.5, 0.5, 0.5]])
    stab = np.array([[0.5, 0.96, 0.99], [0.97, 0.99, 0.2], [0.5, 0.9, 0.6], [0.96, 0.96, 0.96]])
    shape = iou.shape
    assert choose("first", shape).tolist() == [0, 0, 0, 0]
    assert choose("iou", shape, iou=iou).tolist() == [0, 1, 1, 0]                 # ties -> first
    assert choose("stability", shape, stability=stab).tolist() == [2, 1, 1, 0]
    # IoU head among the stable (>= 0.95) outputs; none stable -> output 0
    assert choose("iou_stable", shape, iou=iou, stability=stab).tolist() == [1, 1, 0, 0]
    # output 0 where stable; else the IoU head among the stable; else the most stable
    assert choose("first_stable", shape, iou=iou, stability=stab).tolist() == [1, 0, 1, 0]
    assert choose("iou_stable", shape, iou=iou, stability=stab, stability_thresh=0.99).tolist() == [2, 1, 0, 0]
    # output 0 unless its predicted IoU is below 0.88 -> output 1
    assert choose("first_confident", shape, iou=iou).tolist() == [0, 1, 1, 1]
    assert choose("first_confident", shape, iou=iou, iou_thresh=0.15).tolist() == [0, 1, 0, 0]
    # first_consensus also needs output 0 to agree least with the others (strictly)
    agree = np.array([[0.2, 0.5, 0.5], [0.3, 0.3, 0.6], [0.1, 0.2, 0.2], [0.5, 0.6, 0.4]])
    assert choose("first_consensus", shape, iou=iou, agreement=agree).tolist() == [0, 0, 1, 0]
    assert choose("first_consensus", (1, 1), iou=[[0.1]], agreement=[[1.0]]).tolist() == [0]  # one output
    with pytest.raises(ValueError, match="needs the stability"):
        choose("iou_stable", shape, iou=iou)
    with pytest.raises(ValueError, match="B x K"):
        choose("iou", (4, 2), iou=iou)
    with pytest.raises(ValueError, match="label-free"):
        choose("oracle", shape)


def test_score_multimask_scores_every_rule_from_logits():
    p, g = random_pairs(6, (24, 24), seed=3)
    m = np.stack([p, np.roll(p, 2, axis=1), g, np.zeros_like(g)], axis=1)
    rng = np.random.default_rng(0)
    logits = np.where(m, rng.uniform(0.1, 3.0, m.shape), -rng.uniform(0.1, 3.0, m.shape)).astype(np.float32)
    iou = rng.random((6, 4))
    out = score_multimask(logits, g, iou_pred=iou, select="iou_stable")
    assert out["modes"] == ["oracle", *LABEL_FREE_MODES]
    d_all = np.stack([dice(m[:, k], g) for k in range(4)], 1)
    np.testing.assert_allclose(out["dsc_all"], d_all)
    np.testing.assert_allclose(out["score_stability"], stability_scores(logits))
    np.testing.assert_allclose(out["score_agreement"], agreement_scores(m))
    for mode in LABEL_FREE_MODES:
        idx = select_masks(logits, iou_pred=iou, mode=mode)
        np.testing.assert_array_equal(out[f"idx_{mode}"], idx)
        np.testing.assert_array_equal(out[f"dsc_{mode}"], d_all[np.arange(6), idx])
    np.testing.assert_array_equal(out["dsc"], out["dsc_iou_stable"])
    # masks only: the rules that threshold the logits are absent
    assert "dsc_stability" not in score_multimask(m, g, iou_pred=iou) and "idx_agreement" in score_multimask(m, g)
    with pytest.raises(ValueError, match="select"):
        score_multimask(m, g, iou_pred=iou, select="stability")


def test_binarize_thresholds_like_sigmoid():
    x = torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 1e-6, 2.0])
    assert binarize(x).tolist() == (torch.sigmoid(x) > 0.5).tolist()
    assert binarize(np.array([0, 1, 1], np.uint8)).tolist() == [False, True, True]
    with pytest.raises(ValueError):
        binarize(np.array([0, 2]))


def test_score_multimask():
    p, g = random_pairs(9, (40, 40), seed=9)
    m = np.stack([p, np.roll(p, 2, axis=1), g], axis=1)
    m[0, 2] = False
    iou = torch.rand(9, 3)
    out = score_multimask(m, g[:, None], iou_pred=iou, spacing=(0.5, 0.5), nsd_tolerance=1.0,
                          metrics=("dsc", "hd", "nsd"))
    d_all = np.stack([dice(m[:, k], g) for k in range(3)], 1)
    np.testing.assert_allclose(out["dsc_all"], d_all)
    idx = np.argmax(d_all, 1)
    np.testing.assert_array_equal(out["idx"], idx)
    chosen = m[np.arange(9), idx]
    np.testing.assert_allclose(out["hd95"], hd95(chosen, g, empty="published"))
    np.testing.assert_allclose(out["hd95_mm"], 0.5 * out["hd95"])
    np.testing.assert_allclose(out["nsd"], nsd(chosen, g, 1.0, spacing=0.5))
    np.testing.assert_array_equal(out["dsc_iou"], d_all[np.arange(9), select_masks(m, iou_pred=iou, mode="iou")])
    np.testing.assert_array_equal(out["dsc_first"], d_all[:, 0])
    np.testing.assert_array_equal(out["intersection"], (chosen & g).sum((1, 2)))
    np.testing.assert_array_equal(out["dsc_oracle"], out["dsc"])
    # --select iou: the iou choice is scored (HD95 of its output), the oracle's DSC is still there
    by_iou = score_multimask(m, g[:, None], iou_pred=iou, select="iou", spacing=[(0.5, 0.5)] * 4 + [None] * 5)
    idx_iou = select_masks(m, iou_pred=iou, mode="iou")
    np.testing.assert_array_equal(by_iou["idx"], idx_iou)
    np.testing.assert_array_equal(by_iou["dsc"], d_all[np.arange(9), idx_iou])
    np.testing.assert_array_equal(by_iou["dsc_oracle"], out["dsc"])
    np.testing.assert_allclose(by_iou["hd95"], hd95(m[np.arange(9), idx_iou], g, empty="published"))
    assert np.isnan(by_iou["hd95_mm"][4:]).all()
    np.testing.assert_allclose(by_iou["hd95_mm"][:4], 0.5 * by_iou["hd95"][:4])
    with pytest.raises(ValueError, match="select"):
        score_multimask(m, g, select="iou")  # no IoU predictions


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.7), (2.5, 0.8, 0.8)])
def test_packed_rings_match_probing_the_ring_offset_by_offset(spacing):
    """The bit-packed first rings give, for every query, the first ring offset (in table order) that
    lands on a feature, as probing offset by offset does; queries with none stay unresolved."""
    from medsegx.metrics import surface
    offs, dist, reach = surface._ring(spacing)
    stop = surface._packed_stop(dist)
    assert stop > 1 and stop <= surface._PACKED_OFFSETS
    rng = np.random.default_rng(0)
    shape = (6, 20, 72) if len(spacing) == 3 else (40, 200)  # rows of 200 or 72: not whole 64-bit words
    feat = np.zeros(shape, bool)
    inner = tuple(slice(int(r), n - int(r)) for r, n in zip(reach, shape, strict=True))
    feat[inner] = rng.random(feat[inner].shape) < 0.03
    strides = np.array([int(np.prod(shape[k + 1:])) for k in range(len(shape))])
    flat_off = offs @ strides
    queries = np.flatnonzero(np.pad(np.ones(feat[inner].shape, bool), [(int(r), int(r)) for r in reach]))
    got, pending = surface._packed_rings(queries, feat.reshape(-1), flat_off, dist, stop)
    flat = feat.reshape(-1)
    want = np.full(queries.size, np.nan)
    for j, q in enumerate(queries):
        hits = np.flatnonzero(flat[q + flat_off[:stop]])
        if hits.size:
            want[j] = dist[hits[0]]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pending, np.flatnonzero(np.isnan(want)))
    assert 0 < pending.size < queries.size
