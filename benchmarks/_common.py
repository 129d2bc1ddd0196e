"""Shared by the benchmark scripts: thread pinning before torch loads, and the compared configurations."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass


def pin_threads_from_argv(argv: list[str] | None = None, default: str = "1") -> str:
    """Set OMP/MKL threads from ``--threads N`` before torch starts its thread pool; returns N."""
    argv = sys.argv if argv is None else argv
    threads = default
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    return threads


@dataclass(frozen=True)
class Config:
    """One compared setting: the encoder path and the autocast dtype."""

    name: str
    fast: bool
    bf16: bool


CONFIGS = {
    "stock-fp32": Config("stock fp32", fast=False, bf16=False),
    "stock-bf16": Config("stock bf16", fast=False, bf16=True),
    "fast-fp32": Config("fast fp32", fast=True, bf16=False),
    "fast-bf16": Config("fast bf16", fast=True, bf16=True),
}


def synthetic_batch(batch: int, seed: int = 0, device: str = "cpu") -> dict:
    """A dataset-shaped batch (the keys the engine reads): random images, one elliptic target and its box."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    label = (((yy - 128) / 60) ** 2 + ((xx - 120) / 45) ** 2 < 1).to(torch.int64)
    b = {
        "image": torch.rand(batch, 3, 256, 256, generator=g) * 255,
        "label": label[None, None].repeat(batch, 1, 1, 1),
        "box": torch.tensor([[70.0, 64.0, 170.0, 192.0]]).repeat(batch, 1),
        "modal": torch.randint(0, 10, (batch,), generator=g),
        "organ": torch.tensor([[1, 4, 17, 59]]).repeat(batch, 1),
        "name": [f"synthetic/{i}.npy" for i in range(batch)],
        "index": torch.arange(batch),
    }
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def machine_header() -> str:
    """The line every benchmark prints first: CPU model, native bf16 yes/no (``medsegx.runtime``'s detection,
    the one the commands log), CPUs, torch and its threads."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from medsegx.runtime import cpu_info

    return (f"# {cpu_info().describe()}; {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def matmul_gflops(dtype, n: int = 1024, seconds: float = 1.0, clock=None) -> float:
    """This machine's rate for an ``n^3`` matrix product in ``dtype`` (GFLOP/s, best of ~``seconds`` of calls,
    timed by ``clock``, default ``time.perf_counter``): the yardstick the encoder's rate is compared with in
    the same run."""
    import time

    clock = clock or time.perf_counter
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (oneDNN/MKL kernel selection)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = clock()
        torch.mm(a, b, out=out)
        dt = clock() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best / 1e9
