"""Benchmark medsegx.metrics HD95 and NSD against MONAI (and DeepMind's surface-distance).

One thread everywhere (OMP/MKL/OpenBLAS threads and torch.set_num_threads(1)), so ratios
compare algorithms, not cores. Each line is the median of --repeats runs, ours and the
baseline alternating (A, B, A, B, ...) in the same process so that machine load hits both.

    python benchmarks/bench_metrics.py                 # 2-D: 256 slices of 256 x 256; 3-D: the CT's organs
    python benchmarks/bench_metrics.py --n 64 --repeats 5 --sets realistic
    python benchmarks/bench_metrics.py --sets ct3d blobs3d

Data sets (seeded): 2-D, ``--n`` slices of ``--size``: "realistic" = smooth label blobs and
predictions with 0-3 px boundary noise, small shifts, occasional false-positive islands and
misses; "hard" = large shifts, dilation/erosion by up to 3 px and salt noise (many far-away
edge pixels). 3-D (distances in mm, MONAI given the same spacing): "ct3d" = the organ labels of
the shared CT volume (``../shared/data/volumes/ct_abdomen_small_label.nii.gz``, 30 x 101 x 122,
3 mm; one item per organ of at least 20 voxels) and predictions with boundary noise of up to
3 mm, 1-voxel shifts and occasional islands, the evaluation of a predicted CT; "blobs3d" = 4
synthetic 48 x 192 x 192 volumes (spacing 2.5 x 0.8 x 0.8) each filled to ~20 % by one large
blob, the unfavourable case: the work here grows with the surface, MONAI's with the volume.
``surface-distance`` (pip install surface-distance) is timed when importable; it weighs edges
by surfel area, so its values differ by definition and only its time is comparable.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_header  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.metrics import hd95, nsd  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="slices per batch")
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per side (median reported)")
    parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in pixels")
    parser.add_argument("--sets", nargs="+", default=["realistic", "hard", "ct3d", "blobs3d"],
                        choices=["realistic", "hard", "ct3d", "blobs3d"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak", choices=["ours", "monai"], help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- data

def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
    ry, rx = rng.uniform(0.02 * size, 0.25 * size, 2)
    th = rng.uniform(0, np.pi)
    u = (yy - cy) * np.cos(th) + (xx - cx) * np.sin(th)
    v = -(yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)
    wobble = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 40) * 6
    m = (u / ry) ** 2 + (v / rx) ** 2 + wobble < 1
    return m if m.any() else ((u / ry) ** 2 + (v / rx) ** 2 < 1) | ((yy == int(cy)) & (xx == int(cx)))


def make_pairs(n: int, size: int, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (pred, gt) bool pairs ``n x size x size``; every gt and pred non-empty."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((n, size, size), bool)
    gts = np.zeros((n, size, size), bool)
    for i in range(n):
        g = _blob(rng, size)
        if kind == "realistic":
            if rng.random() < 0.05:  # a miss: the prediction is elsewhere
                p = _blob(rng, size)
            else:
                sdf = ndimage.distance_transform_edt(~g) - ndimage.distance_transform_edt(g)
                amp = rng.uniform(0, 3)
                noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 4)
                noise *= amp / (noise.std() + 1e-9)
                p = np.roll(sdf + noise < 0.5, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
                if rng.random() < 0.15:  # false-positive islands
                    yy, xx = np.mgrid[:size, :size]
                    for _ in range(rng.integers(1, 4)):
                        cy, cx = rng.uniform(0, size, 2)
                        p |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(2, 6) ** 2
        else:
            p = np.roll(g, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
            k = int(rng.integers(-3, 4))
            if k > 0:
                p = ndimage.binary_dilation(p, iterations=k)
            elif k < 0:
                p = ndimage.binary_erosion(p, iterations=-k)
            if rng.random() < 0.3:
                p ^= rng.random((size, size)) < 0.002
        if not p.any():
            p = g.copy()
        preds[i], gts[i] = p, g
    return preds, gts


CT_LABEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "volumes" / "ct_abdomen_small_label.nii.gz"


def _perturbed(g: np.ndarray, rng: np.random.Generator, spacing: tuple[float, ...], amplitude: float,
               sigma: float) -> np.ndarray:
    """A prediction of ``g``: its boundary moved by smooth noise of up to ``amplitude`` (mm), shifted by
    up to one voxel, sometimes with a small false-positive island."""
    sdf = ndimage.distance_transform_edt(~g, sampling=spacing) - ndimage.distance_transform_edt(g, sampling=spacing)
    noise = ndimage.gaussian_filter(rng.normal(size=g.shape), sigma)
    noise *= rng.uniform(0, amplitude) / (noise.std() + 1e-9)
    p = np.roll(sdf + noise < 0.5 * min(spacing), tuple(rng.integers(-1, 2, g.ndim)), axis=tuple(range(g.ndim)))
    if rng.random() < 0.15:
        centre = [rng.integers(0, n) for n in g.shape]
        grids = np.ogrid[tuple(slice(0, n) for n in g.shape)]
        p |= sum((gr - c) ** 2 for gr, c in zip(grids, centre, strict=True)) < rng.uniform(1, 3) ** 2
    return p if p.any() else g.copy()


def make_volumes(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None:
    """3-D (pred, gt) pairs ``n x D x H x W`` and their spacing (z, y, x) in mm; None if the CT is absent."""
    rng = np.random.default_rng(seed)
    if kind == "ct3d":
        if not CT_LABEL.exists():
            return None
        import SimpleITK as sitk

        image = sitk.ReadImage(str(CT_LABEL))
        label = sitk.GetArrayFromImage(image)
        spacing = tuple(float(v) for v in image.GetSpacing()[::-1])
        gts = [label == v for v in np.unique(label)[1:] if (label == v).sum() >= 20]
    else:
        spacing = (2.5, 0.8, 0.8)
        shape = (48, 192, 192)
        grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        gts = []
        for _ in range(4):
            centre = [rng.uniform(0.35 * n, 0.65 * n) for n in shape]
            radii = [rng.uniform(0.25 * n, 0.35 * n) for n in shape]
            wobble = ndimage.gaussian_filter(rng.normal(size=shape), 3) * 4
            gts.append(sum(((gr - c) / r) ** 2 for gr, c, r in zip(grids, centre, radii, strict=True)) + wobble < 1)
    preds = [_perturbed(g, rng, spacing, 3.0, 2.0) for g in gts]
    return np.stack(preds), np.stack(gts), spacing


# ----------------------------------------------------------------------------- baselines

def monai_hd95(p: np.ndarray, g: np.ndarray, spacing=None) -> np.ndarray:
    from monai.metrics import compute_hausdorff_distance
    return compute_hausdorff_distance(torch.from_numpy(p[:, None]), torch.from_numpy(g[:, None]),
                                      include_background=True, percentile=95,
                                      spacing=None if spacing is None else list(spacing)).numpy()[:, 0]


def monai_nsd(p: np.ndarray, g: np.ndarray, tol: float, spacing=None) -> np.ndarray:
    from monai.metrics import compute_surface_dice
    return compute_surface_dice(torch.from_numpy(p[:, None]).float(), torch.from_numpy(g[:, None]).float(),
                                class_thresholds=[tol], include_background=True,
                                spacing=None if spacing is None else list(spacing)).numpy()[:, 0]


def load_surface_distance():
    try:
        import surface_distance
    except ImportError:
        return None
    return surface_distance


def sd_hd95(sd, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.array([sd.compute_robust_hausdorff(sd.compute_surface_distances(g[i], p[i], (1.0, 1.0)), 95)
                     for i in range(len(p))])


def sd_nsd(sd, p: np.ndarray, g: np.ndarray, tol: float) -> np.ndarray:
    return np.array([sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(g[i], p[i], (1.0, 1.0)), tol)
                     for i in range(len(p))])


# ----------------------------------------------------------------------------- timing

def alternate(a, b, repeats: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Median wall and CPU seconds of ``a()`` and ``b()`` run alternately, plus their outputs.

    CPU time (this process only) is printed beside wall time because on a shared machine
    other processes stretch wall time unevenly.
    """
    times = {"a": {"wall": [], "cpu": []}, "b": {"wall": [], "cpu": []}}
    out = {}
    a()  # warm caches (ring tables, imports) outside the timing
    b()
    for _ in range(repeats):
        for key, fn in (("a", a), ("b", b)):
            w, c = time.perf_counter(), time.process_time()
            out[key] = fn()
            times[key]["wall"].append(time.perf_counter() - w)
            times[key]["cpu"].append(time.process_time() - c)
    med = {k: {clock: statistics.median(v) for clock, v in t.items()} for k, t in times.items()}
    return med["a"], med["b"], out["a"], out["b"]


def line(metric: str, ours: dict, base_name: str, base: dict, extra: str) -> str:
    return (f"  {metric:4s} ours {ours['wall'] * 1e3:7.1f} ms wall ({ours['cpu'] * 1e3:6.1f} ms CPU)   {base_name} "
            f"{base['wall'] * 1e3:7.1f} ms wall ({base['cpu'] * 1e3:7.1f} ms CPU)   speed-up x{base['wall'] / ours['wall']:.1f} "
            f"wall, x{base['cpu'] / ours['cpu']:.1f} CPU   {extra}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mib(which: str, args: argparse.Namespace, kind: str) -> str:
    """Extra peak resident memory of one HD95 call, measured in a fresh process (torch's
    allocations are invisible to tracemalloc, so the kernel's resident high-water mark is used)."""
    if not Path("/proc/self/clear_refs").exists():
        return "n/a"
    cmd = [sys.executable, __file__, "--peak", which, "--sets", kind, "--n", str(args.n), "--size", str(args.size),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return f"{float(out.stdout.strip().splitlines()[-1]):.1f} MiB"


def load_set(kind: str, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, tuple | None] | None:
    """(pred, gt, spacing) of a data set; None when its source is absent."""
    if kind in ("ct3d", "blobs3d"):
        return make_volumes(kind, args.seed)
    p, g = make_pairs(args.n, args.size, kind, args.seed)
    return p, g, None


def run_peak(which: str, args: argparse.Namespace) -> None:
    p, g, spacing = load_set(args.sets[0], args)
    fn = (lambda: hd95(p, g, spacing=spacing)) if which == "ours" else (lambda: monai_hd95(p, g, spacing))
    # warm up on one item (imports, tables), so the measured call still allocates its buffers
    hd95(p[:1], g[:1], spacing=spacing) if which == "ours" else monai_hd95(p[:1], g[:1], spacing)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark (VmHWM) to the current size
    base = _status_kib("VmRSS")
    fn()
    print((_status_kib("VmHWM") - base) / 1024)


def bench_set(kind: str, args: argparse.Namespace, sd) -> None:
    data = load_set(kind, args)
    if data is None:
        print(f"[{kind}] skipped: {CT_LABEL} not found")
        return
    p, g, spacing = data
    tol = args.tolerance
    where = f"{len(p)} volumes of {'x'.join(map(str, p.shape[1:]))}, spacing {spacing} mm" if spacing else \
        f"{len(p)} slices of {p.shape[1]}x{p.shape[2]}"
    print(f"[{kind}] {where}")
    ours_t, ref_t, ours, ref = alternate(lambda: hd95(p, g, spacing=spacing), lambda: monai_hd95(p, g, spacing),
                                         args.repeats)
    print(line("HD95", ours_t, "MONAI", ref_t, f"max|diff| {np.max(np.abs(ours - ref)):.2e} "
               f"(max rel {np.max(np.abs(ours - ref) / np.maximum(ref, 1)):.1e})"))
    ours_t, ref_t, ours, ref = alternate(lambda: nsd(p, g, tol, spacing=spacing),
                                         lambda: monai_nsd(p, g, tol, spacing), args.repeats)
    print(line("NSD", ours_t, "MONAI", ref_t, f"max|diff| {np.max(np.abs(ours - ref)):.2e}"))
    if spacing is not None:
        print("  surface-distance: 2-D sets only")
    elif sd is None:
        print("  surface-distance: not importable (pip install surface-distance); skipped")
    else:
        ours_t, ref_t, ours, ref = alternate(lambda: hd95(p, g), lambda: sd_hd95(sd, p, g), args.repeats)
        print(line("HD95", ours_t, "surface-distance", ref_t, f"max|diff| {np.max(np.abs(ours - ref)):.2e} "
                   "(its percentile weighs surfels: another definition)"))
        ours_t, ref_t, ours, ref = alternate(lambda: nsd(p, g, tol), lambda: sd_nsd(sd, p, g, tol), args.repeats)
        print(line("NSD", ours_t, "surface-distance", ref_t, f"max|diff| {np.max(np.abs(ours - ref)):.2e} "
                   "(surfel-area weighted: another definition)"))
    print(f"  peak extra RSS of one HD95 call (fresh process): ours {peak_rss_mib('ours', args, kind)}, "
          f"MONAI {peak_rss_mib('monai', args, kind)} (inputs {2 * p.nbytes / 2**20:.1f} MiB)")


def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.peak:
        run_peak(args.peak, args)
        return
    sd = load_surface_distance()
    print(machine_header(), flush=True)
    print(f"threads: 1 (OMP/MKL/OpenBLAS_NUM_THREADS=1, torch.set_num_threads(1)); median of {args.repeats} "
          f"alternating repeats; NSD tolerance {args.tolerance} (pixels in 2-D, mm in 3-D)")
    for kind in args.sets:
        bench_set(kind, args, sd)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
