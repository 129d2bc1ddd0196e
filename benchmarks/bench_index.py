"""Benchmark the catalog index: first run (list + check every slice) vs cached run.

Generates a synthetic MedSegDB ``train/`` tree of N slices (tiny but valid npy pairs), then opens it
twice, each time in a fresh process so that peak memory is measured per run:

    python benchmarks/bench_index.py                # 1,000,000 slices (2,000,000 files, ~8 GB of inodes)
    python benchmarks/bench_index.py --n 20000 --dir /tmp/bench_tree

The tree is kept in --dir (default: a folder under the system temp dir) and reused when it already
holds N slices; pass --clean to delete it afterwards.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from _common import machine_header  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["CT_Liver", "MRI_Prostate", "CT_LeftKidney", "Endoscope_Polyp", "US_BreastCancer", "Fundus_RetinalVessel",
         "Dermoscopy_Skin", "Xray_LeftLung"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="number of slices (image+mask pairs)")
    parser.add_argument("--per-folder", type=int, default=2000, help="slices per npy_imgs/npy_gts folder")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the tree (kept and reused)")
    parser.add_argument("--workers", type=int, default=None, help="checking threads (default: catalog's)")
    parser.add_argument("--clean", action="store_true", help="delete the tree afterwards")
    parser.add_argument("--phase", choices=["first", "cached"], help=argparse.SUPPRESS)
    return parser


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def build_tree(root: Path, n: int, per_folder: int) -> None:
    """train/DS{d}/{task}/npy_imgs|npy_gts with ``per_folder`` slices per folder, N slices in all."""
    marker = root / "bench_tree.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"n": n, "per_folder": per_folder}:
        print(f"reusing synthetic tree at {root}")
        return
    if root.exists():
        shutil.rmtree(root)
    image = npy_bytes(np.full((4, 4, 3), 7, dtype=np.uint8))
    mask_array = np.zeros((4, 4), dtype=np.uint8)
    mask_array[1:3, 1:3] = 1
    mask = npy_bytes(mask_array)
    start = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for folder_index, first in enumerate(range(0, n, per_folder)):
        leaf = root / "train" / f"DS{folder_index // len(TASKS):04d}" / TASKS[folder_index % len(TASKS)]
        for sub, payload in (("npy_imgs", image), ("npy_gts", mask)):
            directory = leaf / sub
            directory.mkdir(parents=True)
            for i in range(first, min(first + per_folder, n)):
                fd = os.open(directory / f"casenum_{i // 50:06d}_sliceid_{i % 50}.npy", flags, 0o644)
                os.write(fd, payload)
                os.close(fd)
    marker.write_text(json.dumps({"n": n, "per_folder": per_folder}))
    print(f"built {n} slices ({2 * n} files) at {root} in {time.perf_counter() - start:.1f} s")


def run_phase(root: Path, phase: str, workers: int | None) -> None:
    """In a child process: open the catalog once, print timing and this process's peak memory."""
    sys.path.insert(0, str(REPO))
    from medsegx.data.catalog import open_catalog

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    catalog = open_catalog(root / "train", refresh=phase == "first", workers=workers)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"slices": len(catalog), "problems": len(catalog.problems), "seconds": seconds,
                      "peak_mib": peak / 1024, "import_mib": base_rss / 1024}))


def main(args: argparse.Namespace) -> None:
    root = args.dir or Path(tempfile.gettempdir()) / f"medsegx_bench_index_{args.n}"
    if args.phase:
        run_phase(root, args.phase, args.workers)
        return
    print(machine_header(), flush=True)
    build_tree(root, args.n, args.per_folder)
    results = {}
    for phase in ("first", "cached"):
        command = [sys.executable, __file__, "--phase", phase, "--dir", str(root), "--n", str(args.n)]
        if args.workers is not None:
            command += ["--workers", str(args.workers)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[phase] = json.loads(output.strip().splitlines()[-1])
        assert results[phase]["slices"] == args.n, results[phase]
    cache = root / "train" / ".medsegx_index.npz"
    first, cached = results["first"], results["cached"]
    print(f"slices:            {args.n:,} in {-(-args.n // args.per_folder)} folders")
    print(f"first run:         {first['seconds']:.2f} s   peak RSS {first['peak_mib']:.0f} MiB "
          f"(after imports {first['import_mib']:.0f} MiB)")
    print(f"cached run:        {cached['seconds']:.3f} s   peak RSS {cached['peak_mib']:.0f} MiB "
          f"(after imports {cached['import_mib']:.0f} MiB)")
    print(f"speed-up:          {first['seconds'] / cached['seconds']:.0f}x")
    if cache.is_file():
        print(f"cache file:        {cache} ({cache.stat().st_size / 2**20:.1f} MiB)")
    if args.clean:
        shutil.rmtree(root)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
