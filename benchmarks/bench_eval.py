"""End-to-end benchmark of ``evaluate_internal.py``: fast path off vs on (fp32) vs on + bf16 autocast.

Each configuration is the real script run as a subprocess, exactly as a user would start it::

    OMP_NUM_THREADS=1 python evaluate_internal.py --checkpoint <tmp>/SAM --model_type vit_b \
        --data_path <tmp>/db/eval/ID --device_ids --num_workers 0 --batch_size 8 --threads 1 \
        --output_dir <tmp>/out-<config> [--no_fast | --use_amp --amp_dtype bfloat16]

so the figure includes everything the script does: interpreter start and imports, building the
model and loading the SAM file, indexing, the loop (forward, sigmoid, DSC, HD95 per slice) and
writing the reports (Markdown, CSV, box plot, gallery of the worst slices).

Configurations (the first listed is the baseline of the ratios):
  stock-fp32 : ``--no_fast``        segment-anything's padded windows + per-expert loop, float32
  fast-fp32  : (default flags)      medsegx.model.fast attention + batched experts, float32
  fast-bf16  : ``--use_amp --amp_dtype bfloat16``   the fast path under CPU bf16 autocast

Data: a phantom MedSegDB ``eval/ID`` (medsegx.phantom.make_phantom_db, seed 0) of
``--n_slices`` slices spread over the 8 ID sets (7 tasks, MRI with 2 sequences), written once
into a temporary folder, or ``--data`` (an existing ``eval/ID`` folder or MedSegDB root). Weights:
no SAM file is needed; a random SAM ViT-B in Meta's 1024 layout
(``segment_anything.sam_model_registry["vit_b"]()``, seed 0) is written once as
``SAM/sam_vit_b_01ec64.pth`` (speed does not depend on the values; the DSC figures are
meaningless and only compared between configurations as a consistency check).

Timing: wall clock of the whole subprocess (time.perf_counter around it). The configurations
alternate (A, B, C, A, B, C, ...) so that other load on the machine hits them alike; reported is
the median of ``--repeats`` runs (default 3). One untimed warm-up first imports the package and
indexes the data (page cache, index file), so no timed run pays for that alone.

Peak memory: the child's peak resident set size as measured by ``/usr/bin/time -f %M`` (GNU time:
``ru_maxrss`` of the waited-for child, i.e. the largest single process of its tree, in KiB) when
/usr/bin/time exists; otherwise by polling ``VmHWM`` in ``/proc/<pid>/status`` of the child every
20 ms (the main process only). The method used is printed.

    python benchmarks/bench_eval.py                                   # 200 slices, 3 repeats
    python benchmarks/bench_eval.py --n_slices 48 --repeats 3         # a shorter check (~6 min)
    python benchmarks/bench_eval.py --configs stock-fp32 fast-bf16 --num_workers 2

Default duration on the 2-core VM at 1 thread: about 20 minutes (each stock run ~3.5 min for 200
slices; about 12 s of every run is start-up and reports); ``--n_slices 48`` takes about 6 minutes.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "evaluate_internal.py"
GNU_TIME = Path("/usr/bin/time")


@dataclass(frozen=True)
class Config:
    name: str
    flags: tuple[str, ...]


CONFIGS = {
    "stock-fp32": Config("stock fp32 (--no_fast)", ("--no_fast",)),
    "fast-fp32": Config("fast fp32", ()),
    "fast-bf16": Config("fast bf16 (--use_amp)", ("--use_amp", "--amp_dtype", "bfloat16")),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_slices", type=int, default=200, help="phantom eval/ID slices (ignored with --data)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="first = baseline of the ratios")
    p.add_argument("--model_type", default="vit_b", choices=["vit_b", "vit_tiny"],
                   help="vit_b (random SAM file) or vit_tiny (no file; for a quick smoke run)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="--threads of the script and OMP/MKL_NUM_THREADS")
    p.add_argument("--data", default=None, help="an existing eval/ID folder (or MedSegDB root) instead of a phantom")
    p.add_argument("--work_dir", default=None,
                   help="where the phantom, SAM file and reports go (default: a temp folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep --work_dir's temp folder")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for evaluate_internal.py (put last), e.g. --extra --gallery 0")
    return p


# ----------------------------------------------------------------------------- inputs


def make_phantom_id(root: Path, n_slices: int) -> Path:
    """A phantom eval/ID of exactly ``n_slices`` slices; returns the eval/ID folder."""
    from medsegx.phantom import make_phantom_db

    id_sets = 8  # 7 ID tasks, MRI_Prostate with T2 and ADC
    per_set = math.ceil(n_slices / id_sets)
    make_phantom_db(root, n_train_per_task=0, n_eval_per_task=per_set, n_ood_per_site=0, seed=0)
    id_dir = root / "eval" / "ID"
    # Trim round-robin (one slice per set in turn) so every set keeps slices and the total is exact.
    sets = sorted({p.parent.parent for p in id_dir.rglob("npy_imgs/*.npy")})
    extra = sum(len(list((s / "npy_imgs").glob("*.npy"))) for s in sets) - n_slices
    i = 0
    while extra > 0:
        files = sorted((sets[i % len(sets)] / "npy_imgs").glob("*.npy"))
        if len(files) > 1:
            files[-1].unlink()
            (files[-1].parent.parent / "npy_gts" / files[-1].name).unlink()
            extra -= 1
        i += 1
    return id_dir


def write_random_sam(folder: Path) -> Path:
    """A random SAM ViT-B state_dict in Meta's layout (1024 input), under Meta's file name."""
    import torch
    from segment_anything import sam_model_registry

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sam_vit_b_01ec64.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


def resolve_id_dir(data: str) -> Path:
    path = Path(data)
    if (path / "eval" / "ID").is_dir():
        return path / "eval" / "ID"
    if not path.is_dir():
        raise SystemExit(f"--data {data}: not a folder")
    return path


def count_slices(id_dir: Path) -> int:
    return sum(1 for _ in id_dir.rglob("npy_imgs/*.npy"))


# ----------------------------------------------------------------------------- one run


def _poll_vmhwm(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Largest VmHWM (KiB) seen in /proc/<pid>/status until ``stop``."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[0] = max(out[0], int(line.split()[1]))
                        break
        except OSError:
            return
        stop.wait(0.02)


def run_once(cmd: list[str], env: dict[str, str], log: Path, rss_file: Path) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak RSS MiB). Raises with the log's tail on failure."""
    with log.open("w") as logf:
        if GNU_TIME.exists():
            full = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd]
            t0 = time.perf_counter()
            rc = subprocess.run(full, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT).returncode
            secs = time.perf_counter() - t0
            peak_kib = int(rss_file.read_text().strip().splitlines()[-1]) if rc == 0 else 0
        else:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
            peak, stop = [0], threading.Event()
            poller = threading.Thread(target=_poll_vmhwm, args=(proc.pid, stop, peak), daemon=True)
            poller.start()
            rc = proc.wait()
            secs = time.perf_counter() - t0
            stop.set()
            poller.join()
            peak_kib = peak[0]
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"evaluate_internal.py failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    return secs, peak_kib / 1024


def read_dsc(csv_path: Path) -> dict[str, float]:
    with csv_path.open() as f:
        return {row["File"]: float(row["DSC"]) for row in csv.DictReader(f) if row.get("File")}


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _run(args, tmp)
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.keep:
            print(f"# kept {tmp}")


def _run(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    if args.data:
        id_dir = resolve_id_dir(args.data)
    else:
        id_dir = tmp / "db" / "eval" / "ID"
        if count_slices(id_dir) != args.n_slices:
            shutil.rmtree(tmp / "db", ignore_errors=True)
            make_phantom_id(tmp / "db", args.n_slices)
    n = count_slices(id_dir)
    sam_dir = tmp / "SAM"
    if args.model_type == "vit_b":
        write_random_sam(sam_dir)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    configs = [(key, CONFIGS[key]) for key in args.configs]

    def command(key: str) -> list[str]:
        return [sys.executable, str(SCRIPT), "--checkpoint", str(sam_dir), "--model_type", args.model_type,
                "--data_path", str(id_dir), "--device_ids", "--num_workers", str(args.num_workers),
                "--batch_size", str(args.batch_size), "--threads", str(args.threads),
                "--output_dir", str(tmp / f"out-{key}"), *CONFIGS[key].flags, *args.extra]

    # Untimed warm-up: imports (page cache), the catalog index file, the SAM file read once.
    warm = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import medsegx.recipes.evaluate, medsegx.reports; "
            f"from medsegx.data.catalog import open_catalog; open_catalog({str(id_dir)!r})")
    subprocess.run([sys.executable, "-c", warm], env=env, check=True, cwd=ROOT, capture_output=True)
    if args.model_type == "vit_b":
        with (sam_dir / "sam_vit_b_01ec64.pth").open("rb") as f:
            while f.read(1 << 24):
                pass

    rss_how = ("/usr/bin/time -f %M (ru_maxrss of the child: its largest single process)" if GNU_TIME.exists()
               else "polling VmHWM of /proc/<pid>/status every 20 ms (the main process)")
    print(machine_header(), flush=True)
    print(f"# evaluate_internal.py end to end: {args.model_type}, {n} slices of {id_dir}, batch {args.batch_size}, "
          f"num_workers {args.num_workers}, --threads {args.threads} (OMP_NUM_THREADS={args.threads}), "
          f"torch {torch.__version__}", flush=True)
    print(f"# median of {args.repeats} runs, configurations alternating; ratios vs {configs[0][1].name} "
          f"measured in this run; wall clock of the whole subprocess; peak RSS: {rss_how}", flush=True)
    print(f"# command: {' '.join(command(configs[0][0]))}", flush=True)
    if os.path.exists("/proc/loadavg"):
        print(f"# load average at start: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)

    secs: dict[str, list[float]] = {k: [] for k, _ in configs}
    rss: dict[str, list[float]] = {k: [] for k, _ in configs}
    for r in range(args.repeats):
        for key, cfg in configs:
            s, m = run_once(command(key), env, tmp / f"log-{key}.txt", tmp / f"rss-{key}.txt")
            secs[key].append(s)
            rss[key].append(m)
            print(f"#   run {r + 1}/{args.repeats} {cfg.name:<24} {s:8.1f} s  {m:7.0f} MiB", flush=True)

    base = statistics.median(secs[configs[0][0]])
    base_dsc = read_dsc(tmp / f"out-{configs[0][0]}" / "internal" / "ID.csv")
    print(f"{'configuration':<24} {'seconds':>8} {'slices/s':>9} {'ratio':>7} {'peak RSS':>10}  "
          f"{'mean DSC':>8} {'max |dDSC|':>10}")
    for key, cfg in configs:
        med = statistics.median(secs[key])
        dsc = read_dsc(tmp / f"out-{key}" / "internal" / "ID.csv")
        if len(dsc) != n:
            print(f"# warning: {cfg.name} reported {len(dsc)} slices, expected {n}", file=sys.stderr)
        common = dsc.keys() & base_dsc.keys()
        diff = max((abs(dsc[k] - base_dsc[k]) for k in common), default=float("nan"))
        print(f"{cfg.name:<24} {med:8.1f} {n / med:9.3f} {base / med:6.2f}x {max(rss[key]):7.0f} MiB  "
              f"{statistics.fmean(dsc.values()):8.4f} {diff:10.2e}", flush=True)
    if os.path.exists("/proc/loadavg"):
        print(f"# load average at end: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
