"""A synthetic ("phantom") MedSegDB: seeded, fast, learnable slices in the real folder layout.

Each generator draws an organ-like scene on a normalised grid with vectorised numpy: ellipses and
blobs with smooth random boundaries (low-order harmonics of the radius), smooth low-frequency
textures, noise of the modality's kind (Gaussian for CT, Rician with a bias field for MRI, Rayleigh
speckle in a fan for ultrasound, colour mottling for dermoscopy/endoscopy, a vessel tree for the
fundus). The target always differs from its surroundings in intensity or colour, so a model can
learn it; distractors of similar brightness elsewhere keep the box prompt useful.

Layout written by :func:`make_phantom_db` under ``root`` (DESIGN.md section 3)::

    train/<Dataset>/<Modality_Task>/[<Sequence>/]npy_imgs|npy_gts
    eval/ID/<Dataset>/<Modality_Task>/[<Sequence>/]npy_imgs|npy_gts
    eval/OOD/cross_site|cross_task/<Modality_Task>/<Dataset>/[<Sequence>/]finetune|inference/...
    eval/RealWorld/cross_site|cross_task/<Modality_Task>/<Dataset>/inference/...   (realworld=True)

Task folders use names of the published taxonomy; datasets are called ``Phantom*`` so they are
never mistaken for real data. CT and MRI slices are named ``casenum_{case}_sliceid_{k}.npy`` with
``slices_per_case`` slices per case whose anatomy varies smoothly along the case; MRI prostate has
the ``T2`` and ``ADC`` sequence levels (same anatomy, different contrast). 2-D modalities use
``img_{i:04d}.npy``. Cross-site sets use the same task with another intensity/texture style;
cross-task sets (CT_StomachCancer, US_FetalHead) are tasks absent from training. Every slice is
(size, size, 3) uint8 with a non-empty (size, size) uint8 0/1 mask. Output depends only on the seed
and the arguments (and a task's slices do not depend on which other tasks are selected).

CLI: ``python -m medsegx.phantom --out playground/PhantomDB --n 16 --n_eval 8 --n_ood 4``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .data import layout
from .data.grid import SLICE_SIZE

logger = logging.getLogger(__name__)

Generator = Callable[..., tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- drawing primitives


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (Y, X), each (size, size) float32 (Y grows downwards)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    return np.broadcast_to(c[:, None], (size, size)), np.broadcast_to(c[None, :], (size, size))


@lru_cache(maxsize=32)
def _interp_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour and weight of the right one for linear interpolation, end points aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    return lo, (pos - lo).astype(np.float32)


def _lattice_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A (cells+1)^2 N(0, 1) lattice linearly interpolated to (size, size)."""
    lat = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    lo, w = _interp_index(cells + 1, size)
    rows = lat[lo] * (1 - w)[:, None] + lat[lo + 1] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, lo + 1] * w[None, :]


@lru_cache(maxsize=32)
def _pool(kind: str, size: int, cells: int = 0) -> np.ndarray:
    """A fixed (2 size, 2 size) noise field that calls crop from: drawing fresh full-size noise per
    slice costs more than the whole scene, and crops at random offsets/flips vary enough."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{size}/{cells}".encode()))
    n = 2 * size
    if kind == "smooth":
        field = _lattice_noise(rng, n, 2 * cells)
        return (field / field.std()).astype(np.float32)
    if kind == "white":
        return rng.standard_normal((n, n), dtype=np.float32)
    if kind == "speckle":  # Rayleigh (mean 1), laterally correlated like a beamformed image
        a = rng.standard_normal((2, n, n), dtype=np.float32)
        s = np.sqrt(a[0] ** 2 + a[1] ** 2) * np.float32(1 / 1.2533)
        return (s + np.roll(s, 1, 1) + np.roll(s, -1, 1) + np.roll(s, 1, 0)) * np.float32(0.25)
    raise ValueError(kind)


def _crop(rng: np.random.Generator, field: np.ndarray, size: int, flip: bool = True) -> np.ndarray:
    r, c = rng.integers(0, field.shape[0] - size + 1, 2)
    out = field[r:r + size, c:c + size]
    if flip:
        fy, fx = rng.integers(0, 2, 2)
        out = out[:: 1 - 2 * fy, :: 1 - 2 * fx]
    return out


def smooth_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise, ~N(0, 1), varying over about size/cells pixels; a read-only view."""
    return _crop(rng, _pool("smooth", size, cells), size)


def white_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pixel-wise N(0, 1) noise (size, size); a read-only view."""
    return _crop(rng, _pool("white", size), size)


def blob(size: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
         amps: Sequence[float] = (), phases: Sequence[float] = (), extent: float = 1.0) -> np.ndarray:
    """Normalised radius field q of a rotated ellipse with a wavy boundary; inside is q < 1.

    Centre (cy, cx) and radii are in the [-1, 1] grid units. The boundary radius is
    ``1 + sum_k amps[k] cos((k + 2) theta + phases[k])``. Work is confined to the square holding
    q <= ``extent``, so small blobs are cheap; outside it q is 9.
    """
    reach = extent * max(rx, ry) * (1.0 + float(np.sum(np.abs(amps)))) + 2.0 / size
    r0, r1 = _span(cy, reach, size)
    c0, c1 = _span(cx, reach, size)
    q = np.full((size, size), 9.0, dtype=np.float32)
    if r0 >= r1 or c0 >= c1:
        return q
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    dy = (coords[r0:r1] - np.float32(cy))[:, None]
    dx = (coords[c0:c1] - np.float32(cx))[None, :]
    ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    # the rotation is applied to the 1-D offsets, so each full-size term is one broadcast add
    u = dx * (ca / np.float32(rx)) + dy * (sa / np.float32(rx))
    v = dy * (ca / np.float32(ry)) - dx * (sa / np.float32(ry))
    rr = np.sqrt(u * u + v * v)
    if len(amps):
        theta = np.arctan2(v, u)
        bound = np.ones_like(rr)
        term = np.empty_like(rr)
        for k, (a, p) in enumerate(zip(amps, phases, strict=True), start=2):
            np.multiply(theta, np.float32(k), out=term)
            term += np.float32(p)
            np.cos(term, out=term)
            term *= np.float32(a)
            bound += term
        rr /= bound
    q[r0:r1, c0:c1] = rr
    return q


def _span(centre: float, reach: float, size: int) -> tuple[int, int]:
    lo = int(math.floor((centre - reach + 1) / 2 * size))
    hi = int(math.ceil((centre + reach + 1) / 2 * size))
    return max(lo, 0), min(hi, size)


def _wavy(rng: np.random.Generator, n: int = 3, amp: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """Random harmonic amplitudes (decaying with order) and phases for :func:`blob`."""
    amps = rng.uniform(0, amp, n) / np.arange(1, n + 1)
    return amps, rng.uniform(0, 2 * np.pi, n)


@lru_cache(maxsize=16)
def _disk_offsets(width: float) -> tuple[np.ndarray, np.ndarray]:
    r = max(0.0, (width - 1) / 2)
    k = int(math.ceil(r))
    oy, ox = np.mgrid[-k:k + 1, -k:k + 1]
    keep = oy ** 2 + ox ** 2 <= r * r + 0.5
    return oy[keep], ox[keep]


def polyline_mask(size: int, segments: Iterable[tuple[np.ndarray, float]]) -> np.ndarray:
    """Rasterise (points (N, 2) as (y, x) in pixels, width in pixels) segments to a bool mask."""
    by_width: dict[float, list[np.ndarray]] = {}
    for pts, width in segments:
        by_width.setdefault(round(float(width), 1), []).append(pts)
    mask = np.zeros((size, size), dtype=bool)
    for width, parts in by_width.items():
        pts = np.rint(np.concatenate(parts)).astype(np.int64)
        oy, ox = _disk_offsets(width)
        ys = (pts[:, :1] + oy[None]).ravel()
        xs = (pts[:, 1:] + ox[None]).ravel()
        inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        mask[ys[inside], xs[inside]] = True
    return mask


def _curve(rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
           wiggle: float = 0.06) -> np.ndarray:
    """A random smooth path of ``length`` one-pixel steps from ``start`` (y, x), heading ``angle``."""
    n = max(int(length), 2)
    heading = angle + np.cumsum(rng.normal(0.0, wiggle, n))
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1)
    return start[None, :] + np.cumsum(steps, axis=0)


def vessel_tree(rng: np.random.Generator, size: int, root: tuple[float, float], n_trunks: int = 4,
                depth: int = 3, width: float = 3.0) -> np.ndarray:
    """Thin branching lines from ``root`` (y, x in pixels): each branch forks twice, thinner and shorter."""
    segments: list[tuple[np.ndarray, float]] = []
    base = rng.uniform(0, 2 * np.pi)
    stack = [(np.asarray(root, dtype=float), base + i * 2 * np.pi / n_trunks + rng.normal(0, 0.3),
              size * rng.uniform(0.35, 0.5), width, depth) for i in range(n_trunks)]
    while stack:
        start, angle, length, w, d = stack.pop()
        pts = _curve(rng, start, angle, length)
        segments.append((pts, w))
        if d > 0 and len(pts) > 8:
            for frac, side in zip(rng.uniform(0.3, 0.9, 2), (-1, 1), strict=True):
                at = pts[int(frac * (len(pts) - 1))]
                stack.append((at, angle + side * rng.uniform(0.35, 0.9), length * rng.uniform(0.45, 0.7),
                              max(1.0, w - 0.7), d - 1))
    return polyline_mask(size, segments)


def _fan(size: int, apex: float = -1.1, half_angle: float = 0.62, r_min: float = 0.2,
         r_max: float = 2.15) -> tuple[np.ndarray, np.ndarray]:
    """Ultrasound sector: (bool mask, depth from the apex) with the apex above the image."""
    y, x = _grid(size)
    depth = np.sqrt((y - apex) ** 2 + x ** 2)
    theta = np.arctan2(x, y - apex)
    return (np.abs(theta) < half_angle) & (depth > r_min) & (depth < r_max), depth


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Rayleigh speckle (mean ~1), laterally correlated; flipped only up-down to keep the lateral grain."""
    return _crop(rng, _pool("speckle", size), size, flip=False)


def _paint(canvas: np.ndarray, mask: np.ndarray, value) -> None:
    """canvas[mask] = value; a (3, H, W) canvas takes a (H, W) mask and a (3, 1, 1) colour."""
    np.copyto(canvas, np.asarray(value, dtype=canvas.dtype), where=mask)


# --------------------------------------------------------------------------- scene generators
#
# A generator takes (case_rng, noise_rng, t, style, sequence, target, size) and returns an image,
# (size, size) grey or (size, size, 3) colour, float in 0..255, and a bool mask. `case_rng` is
# drawn first and identically for every slice of a case (anatomy); `t` in (0, 1) is the position
# along the case; `noise_rng` is per slice.

CT_STYLES = {
    "a": {"noise": 6.0, "contrast": 1.0, "offset": 0.0, "blur_noise": 2.0},
    "b": {"noise": 13.0, "contrast": 0.8, "offset": 18.0, "blur_noise": 5.0},   # another scanner/kernel
    "c": {"noise": 18.0, "contrast": 0.9, "offset": -10.0, "blur_noise": 8.0},  # low-dose clinical
}


def ct_abdomen(case_rng, noise_rng, t, style, sequence, target, size):
    """Axial abdominal CT in a 40/400 window: body, fat rim, liver, spleen, kidneys, spine, stomach."""
    st = CT_STYLES[style]
    g = case_rng
    s = 0.6 + 0.4 * math.sin(math.pi * (0.1 + 0.8 * t))      # organ cross-section along the case
    body_scale = g.uniform(0.88, 1.0) * (1.06 if style == "b" else 1.0)
    body_q = blob(size, 0.05, 0.0, 0.66 * body_scale, 0.9 * body_scale, g.uniform(-0.05, 0.05))
    img = np.zeros((size, size), dtype=np.float32)                     # air
    body = body_q < 1
    img[body] = 42                                                      # subcutaneous fat
    inner = body_q < 0.88
    visceral = 118 + 30 * np.clip(smooth_noise(g, size, 10), -1.5, 1.5)  # bowel and mesenteric fat
    img[inner] = visceral[inner]
    liver_c = (g.uniform(-0.2, -0.05), g.uniform(-0.45, -0.3))
    liver_r = (g.uniform(0.3, 0.38) * s, g.uniform(0.3, 0.4) * s)
    liver_q = blob(size, liver_c[0], liver_c[1], liver_r[0], liver_r[1], g.uniform(-0.4, 0.4), *_wavy(g, 4, 0.12))
    liver = (liver_q < 1) & inner
    img[liver] = 146 + 5 * smooth_noise(noise_rng, size, 16)[liver]
    spleen = (blob(size, 0.2, 0.55, 0.13 * s, 0.1 * s, 0.5, *_wavy(g, 2, 0.1)) < 1) & inner
    _paint(img, spleen, 140)
    for side in (-1, 1):
        kq = blob(size, 0.3, side * 0.33, 0.1 * s + 0.02, 0.07 * s + 0.02, side * 0.4)
        _paint(img, kq < 1, 178)
        _paint(img, kq < 0.35, 95)                                      # renal pelvis
    vert = blob(size, 0.45, 0.0, 0.11, 0.12)
    _paint(img, vert < 1, 250)
    _paint(img, vert < 0.75, 205)
    _paint(img, blob(size, 0.25, 0.07, 0.05, 0.05) < 1, 192)            # aorta
    st_c = (g.uniform(-0.35, -0.2), g.uniform(0.2, 0.35))
    st_r = (g.uniform(0.14, 0.2) * s + 0.03, g.uniform(0.18, 0.24) * s + 0.03)
    st_amps = _wavy(g, 3, 0.1)
    stomach_q = blob(size, st_c[0], st_c[1], st_r[0], st_r[1], g.uniform(-0.5, 0.5), *st_amps, extent=1.2)
    _paint(img, (stomach_q < 1) & inner, 132)                           # enhancing wall
    _paint(img, (stomach_q < 0.8) & inner, 55)                          # fluid and gas content

    # lesions are case anatomy: CT_Liver and CT_LiverCancer slices of a case are the same image
    # with different masks, as when one multi-label volume is converted
    if target in ("liver", "liver_tumor"):
        tr = (0.25 + 0.12 * math.sin(math.pi * t)) * min(liver_r)
        tc = (liver_c[0] + g.uniform(-0.3, 0.3) * liver_r[0], liver_c[1] + g.uniform(-0.3, 0.3) * liver_r[1])
        tumor = (blob(size, tc[0], tc[1], tr, tr * g.uniform(0.8, 1.2), 0.0, *_wavy(g, 3, 0.15)) < 1) & liver
        img[tumor] = 98 + 6 * smooth_noise(noise_rng, size, 20)[tumor]  # hypodense lesion
        mask = liver if target == "liver" else tumor
    elif target == "stomach_cancer":
        ang = g.uniform(0, 2 * np.pi)
        mc = (st_c[0] + 0.85 * st_r[0] * math.sin(ang), st_c[1] + 0.85 * st_r[1] * math.cos(ang))
        mr = (0.35 + 0.1 * math.sin(math.pi * t)) * min(st_r)
        mass = blob(size, mc[0], mc[1], mr, mr * 1.3, ang, *_wavy(g, 3, 0.2)) < 1
        mask = mass & (stomach_q < 1.15) & inner
        img[mask] = 160 + 8 * smooth_noise(noise_rng, size, 20)[mask]  # enhancing wall thickening
    else:
        raise ValueError(f"unknown CT target {target!r}")
    noise = white_noise(noise_rng, size) * st["noise"]
    noise += smooth_noise(noise_rng, size, 24) * st["blur_noise"]
    img = np.where(body, (img - 128) * st["contrast"] + 128 + st["offset"] + noise, 0.0)
    return img, mask


MRI_PROSTATE_CONTRAST = {  # tissue -> intensity per sequence (0..255 after percentile scaling)
    "T2": {"fat": 195, "muscle": 70, "bladder": 235, "gland": 115, "pz": 175, "bone": 60, "marrow": 170,
           "rectum": 50},
    "ADC": {"fat": 35, "muscle": 110, "bladder": 240, "gland": 70, "pz": 125, "bone": 45, "marrow": 60,
            "rectum": 95},
}
MRI_STYLES = {
    "a": {"bias": 0.12, "noise": 6.0, "gamma": 1.0},
    "b": {"bias": 0.3, "noise": 11.0, "gamma": 0.75},   # other coil, stronger bias field
    "c": {"bias": 0.35, "noise": 14.0, "gamma": 1.25},
}


def mri_prostate(case_rng, noise_rng, t, style, sequence, target, size):
    """Axial pelvic MRI (T2 or ADC contrast): fat, muscle, bladder, femoral heads, rectum, prostate."""
    c = MRI_PROSTATE_CONTRAST[sequence or "T2"]
    st = MRI_STYLES[style]
    g = case_rng
    s = 0.55 + 0.45 * math.sin(math.pi * (0.1 + 0.8 * t))
    pelvis_q = blob(size, 0.0, 0.0, 0.68 * g.uniform(0.92, 1.0), 0.92 * g.uniform(0.92, 1.0))
    img = np.zeros((size, size), dtype=np.float32)
    _paint(img, pelvis_q < 1, c["fat"])
    _paint(img, pelvis_q < 0.8, c["muscle"])
    _paint(img, blob(size, -0.3 - 0.1 * t, 0.0, 0.22 * (1.2 - t), 0.3 * (1.2 - t)) < 1, c["bladder"])
    for side in (-1, 1):
        fq = blob(size, 0.08, side * 0.62, 0.16, 0.15)
        _paint(img, fq < 1, c["bone"])
        _paint(img, fq < 0.8, c["marrow"])
    _paint(img, blob(size, 0.42, 0.0, 0.09, 0.1) < 1, c["rectum"])
    pc = (g.uniform(0.05, 0.15), g.uniform(-0.05, 0.05))
    pr = (g.uniform(0.14, 0.19) * s + 0.02, g.uniform(0.18, 0.24) * s + 0.02)
    prostate_q = blob(size, pc[0], pc[1], pr[0], pr[1], g.uniform(-0.2, 0.2), *_wavy(g, 3, 0.08))
    prostate = prostate_q < 1
    # peripheral zone: the posterior crescent of the gland
    y, _ = _grid(size)
    pz = prostate & (prostate_q > 0.55) & (y > pc[0])
    _paint(img, prostate, c["gland"])
    _paint(img, pz, c["pz"])
    if target != "prostate":
        raise ValueError(f"unknown MRI target {target!r}")
    img += 10 * smooth_noise(noise_rng, size, 18) * (pelvis_q < 1)
    img *= 1 + st["bias"] * smooth_noise(g, size, 3)
    n0, n1 = white_noise(noise_rng, size) * st["noise"], white_noise(noise_rng, size) * st["noise"]
    img = np.sqrt((img + n0) ** 2 + n1 ** 2)                           # Rician magnitude noise
    img = 255 * (np.clip(img, 0, 255) / 255) ** st["gamma"]
    return img, prostate


US_STYLES = {"a": {"gain": 1.0, "atten": 0.35}, "b": {"gain": 0.8, "atten": 0.6}, "c": {"gain": 1.2, "atten": 0.5}}


def us_scene(case_rng, noise_rng, t, style, sequence, target, size):
    """Sector ultrasound with speckle: a hypoechoic breast lesion or a fetal head (skull ring)."""
    st = US_STYLES[style]
    g = case_rng
    fan, depth = _fan(size)
    y, x = _grid(size)
    echo = 95 + 35 * smooth_noise(g, size, 5)                           # glandular vs fatty tissue
    echo[y < -0.85] = 170                                               # skin line
    if target == "breast_lesion":
        lc = (g.uniform(-0.3, 0.25), g.uniform(-0.35, 0.35))
        lr = g.uniform(0.12, 0.25)
        q = blob(size, lc[0], lc[1], lr * g.uniform(0.6, 0.9), lr, g.uniform(-0.3, 0.3), *_wavy(g, 4, 0.25),
                 extent=1.3)
        mask = (q < 1) & fan
        shadow = (np.abs(x - lc[1]) < lr * 0.8) & (y > lc[0]) & fan   # posterior acoustic shadow
        echo = np.where(shadow, echo * 0.6, echo)
        echo = np.where((q < 1.25) & ~mask, echo * 1.5, echo)         # echogenic halo
        echo = np.where(mask, 12.0, echo)
    elif target == "fetal_head":
        hc = (g.uniform(-0.05, 0.2), g.uniform(-0.15, 0.15))
        hr = (g.uniform(0.32, 0.42), g.uniform(0.4, 0.5))
        tilt = g.uniform(-0.6, 0.6)
        q = blob(size, hc[0], hc[1], hr[0], hr[1], tilt, extent=1.4)
        echo = np.where(q < 1.35, 12.0, echo)                           # amniotic fluid
        echo = np.where(q < 1.0, 200.0, echo)                           # skull
        echo = np.where(q < 0.9, 55.0, echo)                            # brain
        mid = (blob(size, hc[0], hc[1], 0.015, hr[1] * 0.7, tilt) < 1) & (q < 0.9)
        echo = np.where(mid, 140.0, echo)                               # midline echo
        mask = (q < 1) & fan
    else:
        raise ValueError(f"unknown US target {target!r}")
    img = echo * _speckle(noise_rng, size) * np.exp(-st["atten"] * (depth - 0.2)) * st["gain"]
    return np.where(fan, img, 0.0), mask


DERM_STYLES = {
    "a": {"skin": (222, 170, 140), "lesion": ((150, 95, 65), (85, 50, 35)), "light": 0.1},
    "b": {"skin": (170, 118, 88), "lesion": ((105, 62, 40), (55, 32, 22)), "light": 0.25},
    "c": {"skin": (235, 190, 170), "lesion": ((175, 110, 90), (110, 60, 50)), "light": 0.15},
}


def _rgb(colour) -> np.ndarray:
    """A colour as a (3, 1, 1) float32 array: colour scenes are built channel-first because numpy
    broadcasting over a trailing axis of 3 runs its inner loop 3 elements at a time."""
    return np.asarray(colour, dtype=np.float32).reshape(3, 1, 1)


@lru_cache(maxsize=8)
def _radius2(size: int) -> np.ndarray:
    y, x = _grid(size)
    return x * x + y * y


def dermoscopy(case_rng, noise_rng, t, style, sequence, target, size):
    """Skin-coloured field of view with a mottled brown lesion and a few hairs."""
    st = DERM_STYLES[style]
    g = case_rng
    shade = 1 + st["light"] * smooth_noise(g, size, 3) + 0.03 * smooth_noise(noise_rng, size, 30)
    img = _rgb(st["skin"]) * shade
    q = blob(size, g.uniform(-0.25, 0.25), g.uniform(-0.25, 0.25), g.uniform(0.22, 0.5), g.uniform(0.22, 0.5),
             g.uniform(0, np.pi), *_wavy(g, 4, 0.18))
    mask = q < 1
    light, dark = (_rgb(c) for c in st["lesion"])
    mix = np.clip(0.9 + 0.6 * smooth_noise(noise_rng, size, 12) - 0.4 * q, 0, 1)
    img = np.where(mask, light + (dark - light) * mix, img)
    hairs = [(_curve(g, np.array(g.uniform(0, size, 2)), g.uniform(0, 2 * np.pi), size * 0.6, 0.02), 1.5)
             for _ in range(int(g.integers(0, 4)))]
    if hairs:
        _paint(img, polyline_mask(size, hairs), _rgb((40, 30, 25)))
    img *= _vignette(size)                                              # dermatoscope field
    return img, mask


@lru_cache(maxsize=8)
def _vignette(size: int) -> np.ndarray:
    return np.clip((1.32 - np.sqrt(_radius2(size))) * 4, 0, 1)


FUNDUS_STYLES = {
    "a": {"base": (205, 95, 45), "vessel": (120, 30, 18)},
    "b": {"base": (160, 70, 30), "vessel": (95, 25, 12)},
    "c": {"base": (220, 120, 70), "vessel": (140, 45, 30)},
}


def fundus(case_rng, noise_rng, t, style, sequence, target, size):
    """Red-orange retina on black with a bright optic disc; the target is the vessel tree."""
    st = FUNDUS_STYLES[style]
    g = case_rng
    y, x = _grid(size)
    r2 = _radius2(size)
    disc = r2 < 0.92 ** 2
    side = 1 if g.random() < 0.5 else -1
    od = (g.uniform(-0.08, 0.08), side * g.uniform(0.38, 0.48))
    macula = np.exp(-((x + side * 0.1) ** 2 + y ** 2) / 0.02)
    shade = (1 - 0.35 * r2) * (1 + 0.06 * smooth_noise(g, size, 8)) * (1 - 0.3 * macula)
    shade += 0.02 * white_noise(noise_rng, size)
    shade *= disc
    img = _rgb(st["base"]) * shade
    _paint(img, blob(size, od[0], od[1], 0.11, 0.1) < 1, _rgb((245, 205, 150)))
    root = ((od[0] + 1) / 2 * size, (od[1] + 1) / 2 * size)
    mask = vessel_tree(g, size, root, n_trunks=4, depth=3, width=3.5) & disc
    _paint(img, mask, _rgb(st["vessel"]) * (0.9 + 0.1 * shade))
    return img, mask


ENDO_STYLES = {"a": {"mucosa": (195, 95, 85), "polyp": (225, 135, 115)},
               "b": {"mucosa": (170, 110, 100), "polyp": (205, 150, 130)},
               "c": {"mucosa": (210, 80, 70), "polyp": (235, 120, 95)}}


def endoscopy(case_rng, noise_rng, t, style, sequence, target, size):
    """Colonoscopy-like frame: folded mucosa, a dark lumen and a dome-shaded polyp with glints."""
    st = ENDO_STYLES[style]
    g = case_rng
    y, x = _grid(size)
    lumen = (g.uniform(-0.5, 0.5), g.uniform(-0.5, 0.5))
    dist = np.sqrt((y - lumen[0]) ** 2 + (x - lumen[1]) ** 2)
    folds = 0.85 + 0.15 * np.sin(dist * g.uniform(14, 20) + smooth_noise(g, size, 4))
    frame = (np.abs(x) + np.abs(y)) < 1.75                               # octagonal scope frame
    shade = folds * np.clip(dist * 1.2, 0.15, 1.0) * frame
    pq = blob(size, g.uniform(-0.4, 0.4), g.uniform(-0.4, 0.4), g.uniform(0.15, 0.32), g.uniform(0.15, 0.32),
              g.uniform(0, np.pi), *_wavy(g, 3, 0.12))
    mask = pq < 1
    dome = 0.75 + 0.35 * np.clip(1 - pq, 0, 1) + 0.04 * smooth_noise(noise_rng, size, 24)
    img = np.where(mask, _rgb(st["polyp"]) * dome, _rgb(st["mucosa"]) * shade)
    glint = (pq < 0.35) & (smooth_noise(noise_rng, size, 30) > 1.2)
    _paint(img, glint, _rgb((250, 250, 250)))
    return img, mask


GENERATORS: dict[str, Generator] = {
    "ct_abdomen": ct_abdomen, "mri_prostate": mri_prostate, "us": us_scene, "dermoscopy": dermoscopy,
    "fundus": fundus, "endoscopy": endoscopy,
}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PhantomTask:
    """One phantom set: which folder, which scene, and where it goes (``role``).

    role: ``id`` (train + eval/ID), ``ood_site`` / ``ood_task`` (eval/OOD), ``rw_site`` / ``rw_task``
    (eval/RealWorld, with ``realworld=True``).
    """

    folder: str
    dataset: str
    generator: str
    target: str
    role: str = "id"
    style: str = "a"
    sequences: tuple[str | None, ...] = (None,)
    volumetric: bool = False


PHANTOM_TASKS: tuple[PhantomTask, ...] = (
    PhantomTask("CT_Liver", "PhantomAbdomenCT", "ct_abdomen", "liver", volumetric=True),
    PhantomTask("CT_LiverCancer", "PhantomAbdomenCT", "ct_abdomen", "liver_tumor", volumetric=True),
    PhantomTask("MRI_Prostate", "PhantomProstateMRI", "mri_prostate", "prostate", sequences=("T2", "ADC"),
                volumetric=True),
    PhantomTask("US_BreastCancer", "PhantomBreastUS", "us", "breast_lesion"),
    PhantomTask("Dermoscopy_Skin", "PhantomDermoscopy", "dermoscopy", "lesion"),
    PhantomTask("Fundus_RetinalVessel", "PhantomFundus", "fundus", "vessels"),
    PhantomTask("Endoscope_Polyp", "PhantomColonoscopy", "endoscopy", "polyp"),
    PhantomTask("CT_Liver", "PhantomCTSiteB", "ct_abdomen", "liver", "ood_site", "b", volumetric=True),
    PhantomTask("MRI_Prostate", "PhantomMRISiteB", "mri_prostate", "prostate", "ood_site", "b", ("T2",), True),
    PhantomTask("Dermoscopy_Skin", "PhantomDermSiteB", "dermoscopy", "lesion", "ood_site", "b"),
    PhantomTask("CT_StomachCancer", "PhantomGastricCT", "ct_abdomen", "stomach_cancer", "ood_task",
                volumetric=True),
    PhantomTask("US_FetalHead", "PhantomFetalUS", "us", "fetal_head", "ood_task"),
    PhantomTask("CT_Liver", "PhantomClinicCT", "ct_abdomen", "liver", "rw_site", "c", volumetric=True),
    PhantomTask("CT_StomachCancer", "PhantomClinicCT", "ct_abdomen", "stomach_cancer", "rw_task", "c",
                volumetric=True),
)

_OOD, _REAL_WORLD = layout.EXTERNAL_SPLITS
_SITE, _TASK = layout.SHIFT_TYPES
_ROLE_DIR = {"ood_site": (_OOD, _SITE), "ood_task": (_OOD, _TASK), "rw_site": (_REAL_WORLD, _SITE),
             "rw_task": (_REAL_WORLD, _TASK)}


def _rng(seed: int, key: str) -> np.random.Generator:
    """Generator keyed by a string so a set's content never depends on what else is generated."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def make_phantom_slice(task: PhantomTask | str, seed: int = 0, case: int = 0, t: float = 0.5,
                       sequence: str | None = None, style: str | None = None, size: int = SLICE_SIZE,
                       index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One slice in memory: image (size, size, 3) uint8 and mask (size, size) uint8 0/1 (non-empty).

    ``task`` is a :class:`PhantomTask` or a folder name (its first ``id`` entry, else the first
    entry). ``case`` fixes the anatomy, ``t`` in (0, 1) the position along the case, ``index`` the
    slice's noise.
    """
    spec = _spec(task) if isinstance(task, str) else task
    generator = GENERATORS[spec.generator]
    seq = sequence if sequence is not None else spec.sequences[0]
    style = style or spec.style
    for attempt in range(8):
        case_rng = _rng(seed, f"case/{spec.dataset}/{case}/{attempt}")
        # the task folder is left out of both keys: tasks of one dataset share cases and images
        noise_rng = _rng(seed, f"noise/{spec.dataset}/{seq}/{case}/{index}/{attempt}")
        img, mask = generator(case_rng, noise_rng, t, style, seq, spec.target, size)
        if int(mask.sum()) >= 8:
            break
    else:  # pragma: no cover - the scenes are built to always hold their target
        raise RuntimeError(f"phantom {spec.folder}/{spec.dataset} case {case}: empty target after 8 tries")
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # grey scenes are (H, W), colour scenes channel-first (3, H, W); slices are (H, W, 3)
    img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else np.ascontiguousarray(img.transpose(1, 2, 0))
    return img, mask.astype(np.uint8)


def _spec(folder: str) -> PhantomTask:
    matches = [s for s in PHANTOM_TASKS if s.folder == folder]
    if not matches:
        raise ValueError(f"unknown phantom task {folder!r}; known: {sorted({s.folder for s in PHANTOM_TASKS})}")
    return next((s for s in matches if s.role == "id"), matches[0])


def _write_set(out: Path, spec: PhantomTask, sequence: str | None, n: int, seed: int,
               slices_per_case: int, size: int, first_case: int) -> int:
    """Write ``n`` slices of ``spec`` into ``out/npy_imgs|npy_gts``; returns the count."""
    if n <= 0:
        return 0
    (out / layout.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / layout.MASKS_DIR).mkdir(parents=True, exist_ok=True)
    per_case = slices_per_case if spec.volumetric else 1
    for i in range(n):
        case, j = divmod(i, per_case)
        case += first_case
        if spec.volumetric:
            t = (j + 0.5) / per_case
            # slice ids start at a per-case offset and skip like a real 2-3 mm stack would
            start = int(_rng(seed, f"start/{spec.dataset}/{case}").integers(5, 60))
            name = layout.slice_name(f"{case:03d}", start + 2 * j)
        else:
            t, name = 0.5, f"img_{case:04d}.npy"
        img, mask = make_phantom_slice(spec, seed=seed, case=case, t=t, sequence=sequence, size=size,
                                       index=j)
        np.save(out / layout.IMAGES_DIR / name, img)
        np.save(out / layout.MASKS_DIR / name, mask)
    return n


def make_phantom_db(root: str | Path, n_train_per_task: int = 8, n_eval_per_task: int = 4,
                    n_ood_per_site: int = 4, seed: int = 0, tasks: Iterable[str] | None = None,
                    slices_per_case: int = 4, realworld: bool = False, size: int = SLICE_SIZE) -> Path:
    """Write a phantom MedSegDB under ``root``; returns ``root`` as a Path.

    Args:
        n_train_per_task: slices per task (and per sequence) in ``train/``.
        n_eval_per_task: slices per task (and sequence) in ``eval/ID/``, from other cases.
        n_ood_per_site: slices in each of ``finetune/`` and ``inference/`` of every OOD set (and in
            ``inference/`` of RealWorld sets); cases differ between the two sides.
        tasks: task folder names to keep (e.g. ``["CT_Liver", "US_FetalHead"]``), in every layout;
            None keeps all of :data:`PHANTOM_TASKS`.
        slices_per_case: slices of one CT/MRI case (2-D modalities have one image per case).
        realworld: also write ``eval/RealWorld``.
        size: slice side in pixels (the database uses 256).
    """
    root = Path(root)
    wanted = None if tasks is None else set(tasks)
    if wanted is not None:
        unknown = wanted - {s.folder for s in PHANTOM_TASKS}
        if unknown:
            raise ValueError(f"unknown phantom task(s) {sorted(unknown)}; known: {sorted({s.folder for s in PHANTOM_TASKS})}")
    if slices_per_case < 1 or size < 32:
        raise ValueError("slices_per_case must be >= 1 and size >= 32")
    start = time.perf_counter()
    total = 0
    per_case = max(1, slices_per_case)
    for spec in PHANTOM_TASKS:
        if wanted is not None and spec.folder not in wanted:
            continue
        if spec.role.startswith("rw") and not realworld:
            continue
        step = per_case if spec.volumetric else 1
        for seq in spec.sequences:
            if spec.role == "id":
                n_train_cases = -(-n_train_per_task // step)
                train_folder = layout.id_folder(root / layout.TRAIN, spec.dataset, spec.folder, seq)
                total += _write_set(train_folder, spec, seq,
                                    n_train_per_task, seed, per_case, size, first_case=0)
                eval_folder = layout.id_folder(root / layout.EVAL / layout.ID, spec.dataset, spec.folder, seq)
                total += _write_set(eval_folder, spec, seq,
                                    n_eval_per_task, seed, per_case, size, first_case=n_train_cases + 100)
                continue
            level, group = _ROLE_DIR[spec.role]
            shift_root = root / layout.EVAL / level / group
            subsets = layout.SUBSETS[1:] if level == _REAL_WORLD else layout.SUBSETS  # RealWorld: inference only
            n_cases = -(-n_ood_per_site // step)
            for k, subset in enumerate(subsets):
                folder = layout.external_folder(shift_root, spec.folder, spec.dataset, seq, subset)
                total += _write_set(folder, spec, seq,
                                    n_ood_per_site, seed, per_case, size, first_case=k * (n_cases + 100))
    manifest = {"generator": "medsegx.phantom", "seed": seed, "n_train_per_task": n_train_per_task,
                "n_eval_per_task": n_eval_per_task, "n_ood_per_site": n_ood_per_site,
                "slices_per_case": per_case, "realworld": realworld, "size": size,
                "tasks": sorted(wanted) if wanted is not None else None, "slices": total}
    root.mkdir(parents=True, exist_ok=True)
    (root / "phantom.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    logger.info("phantom MedSegDB: %d slices in %.1fs under %s", total, time.perf_counter() - start, root)
    return root


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("phantom MedSegDB", description="Write a synthetic MedSegDB tree.")
    parser.add_argument("--out", required=True, help="MedSegDB root to create (train/ and eval/ go inside)")
    parser.add_argument("--n", type=int, default=8, help="training slices per task (and sequence)")
    parser.add_argument("--n_eval", type=int, default=4, help="eval/ID slices per task (and sequence)")
    parser.add_argument("--n_ood", type=int, default=4, help="slices per finetune/inference side of each OOD set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=None, help="comma-separated task folders, e.g. CT_Liver,US_FetalHead")
    parser.add_argument("--slices_per_case", type=int, default=4)
    parser.add_argument("--realworld", action="store_true", help="also write eval/RealWorld")
    parser.add_argument("--size", type=int, default=SLICE_SIZE)
    return parser


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    return make_phantom_db(args.out, n_train_per_task=args.n, n_eval_per_task=args.n_eval,
                           n_ood_per_site=args.n_ood, seed=args.seed, tasks=tasks,
                           slices_per_case=args.slices_per_case, realworld=args.realworld, size=args.size)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    main(args)
