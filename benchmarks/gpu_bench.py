"""The python half of benchmarks/gpu_check.sh: MedSegX ViT-B@256 on one NVIDIA GPU.

Self-contained: writes a phantom MedSegDB (medsegx.phantom) and a random SAM ViT-B file in
Meta's layout (``SAM/sam_vit_b_01ec64.pth``; speed does not depend on the values) under
``--work``, then measures, writing ``<out>/gpu_results.md`` (and ``gpu_results.json``) after every
part so a time-out keeps what was done:

1. eval    : whole-model forward (image encoder + adapters + prompt encoder + decoder) images/s,
             ``torch.inference_mode``, batch 256 (``--eval-batch``): stock fp32 (baseline), fast fp32,
             stock bf16, fast bf16 (``torch.autocast(cuda, bfloat16)``), each 3 warm-up + ``--iters``
             timed batches (cuda synchronised), peak ``torch.cuda.max_memory_allocated``.
2. step    : training step on a GPU-resident synthetic batch (``--train-batch``, default 128)
             through ``medsegx.engine.train_one_epoch`` with fp16 autocast + GradScaler:
             stock vs fast (and fast bf16 without scaler); samples/s and peak memory.
3. train   : ``--steps`` (default 50) steps of the production path: phantom train/ loader
             (MedSegDataset + make_train_loader, ``--workers`` workers), fast path, ``--use_amp``
             fp16 + GradScaler, AdamW; samples/s over the steps after the first 5, peak memory.
4. scripts : the real scripts as subprocesses (wall clock, each with its own time-out):
             ``evaluate_internal.py`` on the phantom eval/ID (``--no_fast`` fp32 vs fast
             ``--use_amp --amp_dtype bfloat16``) and ``pretrain.py --max_steps 50 --use_amp``.

``--cpu-smoke`` runs everything on the CPU with tiny sizes (batch 2, 2 iterations, 16 slices):
a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common  # benchmarks/ is the script folder, on sys.path
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsegx import runtime  # noqa: E402
from medsegx.engine import train_one_epoch  # noqa: E402
from medsegx.model import build_model  # noqa: E402

CONFIGS = {  # name: (fast, autocast dtype or None)
    "stock fp32": (False, None),
    "fast fp32": (True, None),
    "stock bf16": (False, torch.bfloat16),
    "fast bf16": (True, torch.bfloat16),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="results folder")
    p.add_argument("--work", default=None, help="phantom + SAM file folder (default <out>/work)")
    p.add_argument("--parts", nargs="+", default=["eval", "step", "train", "scripts"],
                   choices=["eval", "step", "train", "scripts"])
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=10, help="timed batches per eval configuration")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--step-iters", type=int, default=10, help="timed synthetic training steps per configuration")
    p.add_argument("--steps", type=int, default=50, help="loader-driven training steps")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    p.add_argument("--n-train", type=int, default=64, help="phantom train slices per task (8 sets)")
    p.add_argument("--n-eval", type=int, default=64, help="phantom eval/ID slices per task (8 sets)")
    p.add_argument("--script-timeout", type=int, default=120, help="seconds per script run")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests this file)")
    return p


# ----------------------------------------------------------------------------- results file


class Results:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: list[tuple[str, list[str]]] = []
        self.data: dict = {}

    def add(self, title: str, lines: list[str], data: dict | None = None) -> None:
        self.sections.append((title, lines))
        if data is not None:
            self.data[title] = data
        for line in lines:
            print(line, flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = ["# MedSegX GPU check", ""]
        for title, lines in self.sections:
            text += [f"## {title}", "", *lines, ""]
        (self.out / "gpu_results.md").write_text("\n".join(text))
        (self.out / "gpu_results.json").write_text(json.dumps(self.data, indent=1, default=str))


# ----------------------------------------------------------------------------- inputs


def prepare(work: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Phantom MedSegDB (train/ + eval/ID) and a random SAM ViT-B file; returns (db, SAM folder)."""
    from segment_anything import sam_model_registry

    from medsegx.phantom import make_phantom_db

    db, sam = work / "db", work / "SAM"
    if not (db / "phantom.json").exists():
        t0 = time.perf_counter()
        make_phantom_db(db, n_train_per_task=n_train, n_eval_per_task=n_eval, n_ood_per_site=0, seed=0)
        print(f"# phantom MedSegDB in {time.perf_counter() - t0:.1f}s: {db}", flush=True)
    sam.mkdir(parents=True, exist_ok=True)
    path = sam / "sam_vit_b_01ec64.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return db, sam


def synthetic_batch(batch: int, device: torch.device) -> dict:
    return _common.synthetic_batch(batch, 0, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


# ----------------------------------------------------------------------------- parts


def part_eval(model, device, args, res: Results) -> None:
    batch = synthetic_batch(args.eval_batch, device)
    model.eval()
    rates, mems = {}, {}
    for name, (fast, dtype) in CONFIGS.items():
        model.image_encoder.set_fast(fast)
        reset_peak(device)
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                for _ in range(3):
                    model(batch["image"], batch["box"], batch["modal"], batch["organ"])
                sync(device)
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    model(batch["image"], batch["box"], batch["modal"], batch["organ"])
                    sync(device)
                    times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            rates[name], mems[name] = float("nan"), float("nan")
            print(f"# eval {name}: out of memory at batch {args.eval_batch}", flush=True)
            continue
        rates[name] = args.eval_batch / statistics.median(times)
        mems[name] = peak_mib(device)
    base = rates["stock fp32"]
    lines = [f"Whole-model forward (encoder + adapters + decoder), torch.inference_mode, batch {args.eval_batch}, "
             f"median of {args.iters} batches after 3 warm-up; TF32 matmul {torch.backends.cuda.matmul.allow_tf32} "
             "(torch default).", "",
             "| configuration | img/s | vs stock fp32 | peak allocated (MiB) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r:.1f} | {r / base:.2f}x | {mems[n]:.0f} |" for n, r in rates.items()]
    res.add("Evaluation forward (ViT-B@256)", lines, {"img_per_s": rates, "peak_mib": mems})


def part_step(model, device, args, res: Results) -> None:
    from torch.amp import GradScaler

    batch = synthetic_batch(args.train_batch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    configs = {"stock fp16 + GradScaler": (False, "float16", True), "fast fp16 + GradScaler": (True, "float16", True),
               "fast bf16": (True, "bfloat16", False)}
    rates, mems = {}, {}
    for name, (fast, dtype, scaled) in configs.items():
        model.image_encoder.set_fast(fast)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        scaler = GradScaler(device.type) if (scaled and device.type == "cuda") else None
        reset_peak(device)
        kw = dict(device=device, epoch=0, amp=True, amp_dtype=dtype, scaler=scaler, show_progress=False)
        try:
            for _ in range(3):
                train_one_epoch(model, [batch], opt, **kw)
            sync(device)
            times = []
            for _ in range(args.step_iters):
                t0 = time.perf_counter()
                train_one_epoch(model, [batch], opt, **kw)
                sync(device)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            rates[name] = mems[name] = float("nan")
            print(f"# step {name}: out of memory at batch {args.train_batch}", flush=True)
            continue
        finally:
            del opt
        rates[name] = args.train_batch / statistics.median(times)
        mems[name] = peak_mib(device)
    base = next(iter(rates.values()))
    lines = [f"medsegx.engine.train_one_epoch on one GPU-resident synthetic batch of {args.train_batch} "
             "(forward, Dice+BCE, backward, AdamW on adapters + context + decoder), median of "
             f"{args.step_iters} steps after 3 warm-up.", "",
             "| configuration | samples/s | vs stock | peak allocated (MiB) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r:.1f} | {r / base:.2f}x | {mems[n]:.0f} |" for n, r in rates.items()]
    res.add("Training step (synthetic batch)", lines, {"samples_per_s": rates, "peak_mib": mems})


def part_train(model, device, db: Path, args, res: Results) -> None:
    from torch.amp import GradScaler

    from medsegx.data.catalog import open_catalog
    from medsegx.data.dataset import MedSegDataset
    from medsegx.engine import make_train_loader

    model.image_encoder.set_fast(True)
    catalog = open_catalog(db, splits=["train"])
    loader = make_train_loader(MedSegDataset(catalog, train=True, seed=0), args.train_batch, args.workers, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    scaler = GradScaler("cuda") if device.type == "cuda" else None
    stamps: list[float] = []

    def on_step(_step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    reset_peak(device)
    step, epoch, samples = 0, 0, []
    t0 = time.perf_counter()
    while step < args.steps:
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, opt, device=device, epoch=epoch, amp=True, amp_dtype="float16",
                                scaler=scaler, global_step=step, on_step=on_step, max_steps=args.steps,
                                show_progress=False)
        step, epoch = stats["global_step"], epoch + 1
        samples.append(stats["samples"])
    total = time.perf_counter() - t0
    # steady rate: steps after the first `skip` (loader start-up, allocator warm-up); the last
    # batch of an epoch can be smaller, which this ignores (the phantom set divides evenly)
    skip = min(5, len(stamps) - 2) if len(stamps) > 1 else 0
    timed = len(stamps) - 1 - skip
    steady = args.train_batch * timed / (stamps[-1] - stamps[skip]) if timed > 0 else float("nan")
    lines = [f"{step} optimiser steps of batch {args.train_batch} from the phantom train/ set ({len(catalog)} slices, "
             f"{args.workers} loader workers, epochs repeat), fast path, fp16 autocast + GradScaler, AdamW.", "",
             "| figure | value |", "|---|---:|",
             f"| samples/s (steps {skip + 2}..{len(stamps)}) | {steady:.1f} |",
             f"| samples/s (all, incl. loader start) | {sum(samples) / total:.1f} |",
             f"| wall seconds | {total:.1f} |",
             f"| peak allocated (MiB) | {peak_mib(device):.0f} |"]
    res.add("Training, 50 steps from the loader (fp16 + GradScaler)", lines,
            {"steady_samples_per_s": steady, "seconds": total, "peak_mib": peak_mib(device), "steps": step})


def part_scripts(db: Path, sam: Path, work: Path, args, res: Results, device: torch.device) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    dev = ["--device_ids", "0"] if device.type == "cuda" else ["--device_ids"]
    out = work / "script_runs"  # reports and checkpoints (large; removed by gpu_check.sh)
    logs = Path(args.out) / "script_logs"
    common = ["--checkpoint", str(sam), "--model_type", "vit_b", *dev, "--num_workers", str(args.workers)]
    eval_bs = "2" if args.cpu_smoke else "64"
    runs = {
        "evaluate_internal.py --no_fast (fp32)":
            [str(ROOT / "evaluate_internal.py"), *common, "--data_path", str(db / "eval" / "ID"),
             "--batch_size", eval_bs, "--output_dir", str(out / "eval-stock"), "--no_fast"],
        "evaluate_internal.py --use_amp --amp_dtype bfloat16 (fast)":
            [str(ROOT / "evaluate_internal.py"), *common, "--data_path", str(db / "eval" / "ID"),
             "--batch_size", eval_bs, "--output_dir", str(out / "eval-fast-bf16"), "--use_amp", "--amp_dtype",
             "bfloat16"],
        f"pretrain.py --max_steps {args.steps} --use_amp (fp16)":
            [str(ROOT / "pretrain.py"), *common, "--data_path", str(db), "--batch_size", str(args.train_batch),
             "--max_steps", str(args.steps), "--num_epochs", "1000", "--val_every", "1000", "--use_amp",
             "--work_dir", str(out), "--task_name", "pretrain"],
    }
    n_eval = sum(1 for _ in (db / "eval" / "ID").rglob("npy_imgs/*.npy"))
    lines = [f"Wall clock of each script as a subprocess (start-up, model build, data, loop, reports); "
             f"eval/ID = {n_eval} phantom slices, eval batch {eval_bs}.", "",
             "| command | seconds | exit |", "|---|---:|---:|"]
    data = {}
    for name, cmd in runs.items():
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / (name.split()[0].replace(".py", "") + ".log")
        t0 = time.perf_counter()
        with log.open("a") as logf:
            logf.write(f"\n$ {' '.join(cmd)}\n")
            logf.flush()
            try:
                rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, timeout=args.script_timeout,
                                    stdout=logf, stderr=subprocess.STDOUT).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout {args.script_timeout}s"
        secs = time.perf_counter() - t0
        data[name] = {"seconds": secs, "rc": rc}
        lines.append(f"| `{name}` | {secs:.1f} | {rc} |")
        print(f"# {name}: {secs:.1f} s, exit {rc}", flush=True)
    stock = data["evaluate_internal.py --no_fast (fp32)"]["seconds"]
    fast = data["evaluate_internal.py --use_amp --amp_dtype bfloat16 (fast)"]["seconds"]
    lines += ["", f"evaluate_internal.py end to end: fast bf16 is {stock / fast:.2f}x the --no_fast fp32 run."]
    res.add("Scripts end to end", lines, data)


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    if args.cpu_smoke:
        args.eval_batch, args.iters, args.train_batch, args.step_iters = 2, 2, 2, 1
        args.steps, args.workers, args.n_train, args.n_eval = 2, 0, 2, 2
        args.script_timeout = max(args.script_timeout, 600)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible to torch (use --cpu-smoke to test this script on the CPU)")
        # the package's run state on GPU 0 (the loaders read it: pinned memory)
        device = runtime.init_distributed(argparse.Namespace(device_ids=[0])).device
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    res = Results(out)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--cpu-smoke)"
    print(f"GPU: {gpu}", flush=True)
    print(_common.machine_header(), flush=True)
    res.add("Machine", [
        f"- GPU: {gpu}",
        f"- {_common.machine_header().lstrip('# ')}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
        f"- python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {runtime.git_revision()}",
        f"- arguments: {' '.join(sys.argv[1:])}",
    ], {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda})

    t0 = time.perf_counter()
    db, sam = prepare(work, args.n_train, args.n_eval)
    print(f"# inputs ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if {"eval", "step", "train"} & set(args.parts):
        model = build_model("vit_b", checkpoint=sam).to(device)
        if "eval" in args.parts:
            part_eval(model, device, args, res)
        if "step" in args.parts:
            part_step(model, device, args, res)
        if "train" in args.parts:
            part_train(model, device, db, args, res)
        del model
        reset_peak(device)
    if "scripts" in args.parts:
        part_scripts(db, sam, work, args, res, device)
    print(f"# results: {out / 'gpu_results.md'}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
