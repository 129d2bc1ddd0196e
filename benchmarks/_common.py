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
