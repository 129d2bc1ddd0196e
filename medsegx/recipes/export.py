"""``medsegx export``: a MedSegX model written for deployment outside PyTorch (ONNX, :mod:`medsegx.model.onnx_export`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .. import runtime
from ..errors import UserError
from ..fileio import ensure_writable_dir

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> dict:
    """Build the model of the command line on the CPU and export it; returns the JSON written."""
    from ..model.onnx_export import DECODER_FILE, ENCODER_FILE, META_FILE, export_onnx, require
    from .common import model_from_args

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "medsegx export --format onnx")
    args.device_ids = []  # exported on the CPU
    runtime.setup(args, None)
    out = Path(args.output)
    existing = [name for name in (META_FILE, ENCODER_FILE, DECODER_FILE) if (out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"-o {out}: holds an export already ({', '.join(existing)}); --overwrite replaces it")
    ensure_writable_dir(out)
    if args.compile:
        logger.warning("--compile is not used by the export (the graphs are traced from the stock modules)")
        args.compile = False
    model = model_from_args(args, torch.device("cpu"), args.model_weight, for_training=False)
    if args.model_weight is None:
        logger.warning("no --model_weight: exporting the %s backbone alone (ConMoAE adapters at zero)", args.model_type)
    source = {"model_type": args.model_type, "checkpoint": args.checkpoint, "model_weight": args.model_weight}
    meta = export_onnx(model, out, source=source, opset=args.opset, check=not args.no_check)
    logger.info("wrote %s, %s and %s into %s (opset %d, torch %s)", ENCODER_FILE, DECODER_FILE, META_FILE, out,
                meta["opset"], meta["torch"])
    return meta
