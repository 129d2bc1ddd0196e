"""Convert labelled volumes (NIfTI/NRRD/MHA, DICOM series) or 2-D image/mask pairs into MedSegDB.

Examples:
    # a training (ID) dataset with two tasks from one multi-label mask
    python prepare_data.py --images raw/imagesTr --labels raw/labelsTr --modality CT \
        --labels_map 1:Liver,2:LiverCancer --dataset MyHospital --out playground/MedSegDB/train

    # a new OOD site, half of the cases for fine-tuning, MRI with a sequence level
    python prepare_data.py --images 'raw/*_t2.nii.gz' --labels raw/masks --modality MRI \
        --labels_map 1:Prostate --dataset SiteB --sequence T2 \
        --out playground/MedSegDB/eval/OOD/cross_site --ood_site --finetune_fraction 0.5

See medsegx/data/convert.py (and docs/PREPARE_DATA.md) for windows, layout and meta.json.
"""
from __future__ import annotations

import argparse
import logging

from medsegx.data.convert import (
    AXES,
    DEFAULT_PERCENTILES,
    WINDOW_PRESETS,
    ConversionSummary,
    ConvertConfig,
    convert_dataset,
    parse_labels_map,
    parse_window,
)
from medsegx.errors import UserError, user_errors


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MedSegDB conversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="folder or glob of images (NIfTI/NRRD/MHA/PNG/JPG files, DICOM series folders)")
    parser.add_argument("--labels", required=True, help="folder of label files, paired with images by stem")
    parser.add_argument("--modality", required=True, help="modality folder prefix, e.g. CT, MRI, US, Dermoscopy")
    parser.add_argument("--labels_map", required=True,
                        help="label value -> task, e.g. 1:Liver,2:LiverCancer (1+2:Kidney merges), or a .json")
    parser.add_argument("--dataset", required=True, help="dataset (site) folder name")
    parser.add_argument("--out", required=True,
                        help="MedSegDB split root: .../MedSegDB/train, .../eval/ID or .../eval/OOD/cross_site")
    parser.add_argument("--sequence", default=None, help="sequence level under the task, e.g. T2, ADC")
    parser.add_argument("--ood_site", action="store_true",
                        help="write the OOD layout Modality_Task/Dataset/[Sequence]/finetune|inference")
    parser.add_argument("--finetune_fraction", type=float, default=0.5,
                        help="fraction of cases put in finetune/ for --ood_site (0: all in inference/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-case OOD split")
    parser.add_argument("--window", default=None,
                        help=f"CT window 'level,width' or a preset {sorted(WINDOW_PRESETS)}; default per task")
    parser.add_argument("--percentiles", default=",".join(str(p) for p in DEFAULT_PERCENTILES),
                        help="clipping percentiles for non-CT modalities")
    parser.add_argument("--axis", default="axial", choices=AXES, help="slicing axis")
    parser.add_argument("--keep_empty", action="store_true", help="also write slices without foreground")
    parser.add_argument("--min_pixels", type=int, default=1,
                        help="minimum foreground pixels on the 256 grid for a slice to be kept")
    parser.add_argument("--orient", default="LPS", choices=("LPS", "none"),
                        help="re-order volumes to LPS before slicing, or keep the stored order")
    parser.add_argument("--case_ids", default="stem", choices=("stem", "index"),
                        help="case id from the file stem or a zero-padded index")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad case instead of skipping it")
    parser.add_argument("--log_level", default="INFO")
    return parser


def main(args: argparse.Namespace) -> ConversionSummary:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        lower, upper = (float(v) for v in args.percentiles.split(","))
        cfg = ConvertConfig(
            modality=args.modality, dataset=args.dataset, labels_map=parse_labels_map(args.labels_map),
            out=args.out, sequence=args.sequence, ood_site=args.ood_site,
            finetune_fraction=args.finetune_fraction, seed=args.seed, window=parse_window(args.window),
            percentiles=(lower, upper), axis=args.axis, keep_empty=args.keep_empty,
            min_pixels=args.min_pixels, orient=args.orient, case_ids=args.case_ids,
        )
    except ValueError as err:  # a bad option value: said like any other user error
        raise UserError(str(err)) from None
    summary = convert_dataset(args.images, args.labels, cfg, strict=args.strict)
    print(summary.describe())
    return summary


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    with user_errors(args):
        main(args)
