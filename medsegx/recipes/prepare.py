"""Conversion (prepare_data.py, ``medsegx prepare``): NIfTI / NRRD / MHA / DICOM / PNG into MedSegDB."""
from __future__ import annotations

import argparse
import logging

from ..data.convert import ConversionSummary, ConvertConfig, convert_dataset, parse_labels_map
from ..data.presets import parse_window
from ..errors import UserError


def run(args: argparse.Namespace) -> ConversionSummary:
    """Convert --images/--labels into MedSegDB slices under --out; print the summary."""
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = ConvertConfig(
            modality=args.modality, dataset=args.dataset, labels_map=parse_labels_map(args.labels_map),
            out=args.out, sequence=args.sequence, ood_site=args.ood_site,
            finetune_fraction=args.finetune_fraction, seed=args.seed, window=parse_window(args.window),
            percentiles=args.percentiles, axis=args.axis, keep_empty=args.keep_empty,
            min_pixels=args.min_pixels, slice_step=args.slice_step, orient=args.orient, case_ids=args.case_ids,
        )
    except ValueError as err:  # a bad option value: said like any other user error
        raise UserError(str(err)) from None
    summary = convert_dataset(args.images, args.labels, cfg, strict=args.strict)
    print(summary.describe())
    return summary
