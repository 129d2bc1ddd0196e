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
The same command: ``medsegx prepare``; the recipe: medsegx/recipes/prepare.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS

COMMAND = COMMANDS["prepare"]


def get_args_parser():
    return COMMAND.parser(prog="prepare_data.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
