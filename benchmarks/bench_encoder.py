"""Benchmark the MedSegX image encoder: stock segment-anything modules vs the fast path.

Configurations (the first is the baseline of every ratio):
  stock fp32  - segment-anything's padded windows and Attention, expert loop (fast=False)
  stock bf16  - the same under torch.autocast(bfloat16)
  fast fp32   - medsegx.model.fast: pad-aware windows, SDPA + rel-pos mask, batched experts
  fast bf16   - the fast path under torch.autocast(bfloat16)

Measured: encoder + adapters throughput (images/s, inference_mode) per batch size, and a
training step (forward of the whole model + backward into adapters/decoder, freeze policy
applied, train mode; samples/s). Threads are pinned with torch.set_num_threads(--threads)
(and OMP/MKL env) and printed. Each figure is the median of --repeats timed runs after one
untimed warm-up, the configurations alternating (A, B, C, D, A, B, ...) in one process so that
machine load hits them all alike. Weights are SAM's untrained initialisation (speed does not
depend on values); inputs are random images.

Peak memory: for each configuration a fresh child process builds the model, resets the peak-RSS
mark (/proc/self/clear_refs) and runs ONE step; reported is the peak resident set after the step
(VmHWM in /proc/self/status) minus the resident set just before it (VmRSS), i.e. the step's
extra peak RSS in MiB (activations, autocast weight copies, workspaces).

    OMP_NUM_THREADS=1 python benchmarks/bench_encoder.py                     # batches 1 8, train 8
    python benchmarks/bench_encoder.py --batches 1 8 32 --train-batch 8 --repeats 5
    python benchmarks/bench_encoder.py --clock cpu    # process CPU time: steadier on a shared machine
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CONFIGS as _ALL_CONFIGS  # noqa: E402
from _common import Config, machine_header, pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before torch starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.model.build import build_sam256  # noqa: E402
from medsegx.model.config import model_config  # noqa: E402
from medsegx.model.freeze import apply_freeze_policy  # noqa: E402

CONFIGS = _ALL_CONFIGS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="encoder batch sizes")
    parser.add_argument("--train-batch", type=int, default=8, help="training-step batch (0: skip)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="first = baseline of the ratios")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and OMP/MKL env)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (less sensitive to other load)")
    parser.add_argument("--memory-batch", type=int, default=8, help="batch of the peak-memory runs (0: skip)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "encoder|train:config:batch"
    return parser


# ----------------------------------------------------------------------------- workloads


def _build(model_type: str, train: bool) -> torch.nn.Module:
    model = build_sam256(model_config(model_type))
    if train:
        apply_freeze_policy(model)
        return model.train()
    return model.eval()


def _inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, 256, 256, generator=g) * 255
    box = torch.tensor([[40.0, 50.0, 180.0, 200.0]]).repeat(batch, 1)
    modal = torch.randint(0, 10, (batch,), generator=g)
    organ = torch.tensor([[1, 4, 17, 59]]).repeat(batch, 1)
    return image, box, modal, organ


def encoder_step(model: torch.nn.Module, cfg: Config, inputs: tuple[torch.Tensor, ...]) -> None:
    """Image encoder + adapters (the part evaluation spends its time in)."""
    image, _, modal, organ = inputs
    model.image_encoder.set_fast(cfg.fast)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        model.image_encoder(model.preprocess(image), modal, organ)


def train_step(model: torch.nn.Module, cfg: Config, inputs: tuple[torch.Tensor, ...]) -> None:
    """Forward of the whole model + backward into the trainable tensors (no optimizer step)."""
    model.image_encoder.set_fast(cfg.fast)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        out = model(*inputs)
    out.masks.float().sigmoid().mean().backward()


# ----------------------------------------------------------------------------- timing


def _clock(kind: str):
    return time.perf_counter if kind == "wall" else time.process_time


def time_alternating(step, model, configs: list[Config], inputs, repeats: int, clock) -> dict[str, float]:
    """Median seconds per call of each configuration, the configurations interleaved."""
    for cfg in configs:  # warm-up: first-call allocations, kernel selection
        step(model, cfg, inputs)
    times: dict[str, list[float]] = {cfg.name: [] for cfg in configs}
    for _ in range(repeats):
        for cfg in configs:
            t0 = clock()
            step(model, cfg, inputs)
            times[cfg.name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _report(kind: str, batch: int, unit: str, configs: list[Config], secs: dict[str, float]) -> None:
    base = batch / secs[configs[0].name]
    for cfg in configs:
        rate = batch / secs[cfg.name]
        tag = " (baseline)" if cfg is configs[0] else ""
        print(f"{kind:<8} batch {batch:>3}  {cfg.name:<10}  {rate:8.2f} {unit:<9}  x{rate / base:5.2f}{tag}", flush=True)


# ----------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: "5" resets the peak RSS (VmHWM), so the peak of importing torch and
    # building the model does not hide the step's own peak. (getrusage's ru_maxrss is not
    # reset by it and, in a child, starts at the parent's peak: it carries over exec.)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        print(f"# warning: cannot reset peak RSS ({err}); memory figures may be floors", file=sys.stderr)


def memory_child(spec: str, model_type: str) -> None:
    """One step in this fresh process: peak RSS over the step minus RSS before it (JSON)."""
    kind, key, batch = spec.split(":")
    cfg = CONFIGS[key]
    model = _build(model_type, train=kind == "train")
    inputs = _inputs(int(batch))
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    (train_step if kind == "train" else encoder_step)(model, cfg, inputs)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_delta_mib": max(peak - before, 0) / 2**20}))


def measure_memory(kind: str, key: str, batch: int, args) -> float:
    cmd = [sys.executable, __file__, "--memory-child", f"{kind}:{key}:{batch}",
           "--threads", str(args.threads), "--model", args.model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_mib"]


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.model)
        return
    configs = [CONFIGS[k] for k in args.configs]
    clock = _clock(args.clock)
    print(machine_header(), flush=True)
    print(f"# {args.model}, torch {torch.__version__}, threads={torch.get_num_threads()}, clock={args.clock}, "
          f"median of {args.repeats} alternating repeats; ratios vs {configs[0].name} in this run", flush=True)

    if args.batches and not args.memory_only:
        model = _build(args.model, train=False)
        for batch in args.batches:
            secs = time_alternating(encoder_step, model, configs, _inputs(batch), args.repeats, clock)
            _report("encoder", batch, "img/s", configs, secs)

    if args.train_batch and not args.memory_only:
        model = _build(args.model, train=True)
        secs = time_alternating(train_step, model, configs, _inputs(args.train_batch), args.repeats, clock)
        _report("train", args.train_batch, "samples/s", configs, secs)

    if args.memory_batch:
        print(f"# peak memory: extra peak RSS of one step in a fresh process (VmHWM after a reset - VmRSS before), "
              f"batch {args.memory_batch}", flush=True)
        for kind in ("encoder", "train") if args.train_batch else ("encoder",):
            for key in args.configs:
                mib = measure_memory(kind, key, args.memory_batch, args)
                print(f"memory   {kind:<7} {CONFIGS[key].name:<10}  {mib:8.0f} MiB", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
