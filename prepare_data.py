"""Convert labelled volumes (NIfTI/NRRD/MHA, DICOM series) or 2-D image/mask pairs into MedSegDB.

    python prepare_data.py --images raw/imagesTr --labels raw/labelsTr --modality CT \
        --labels_map 1:Liver,2:LiverCancer --dataset MyHospital --out playground/MedSegDB/train

``--help`` shows more examples; docs/PREPARE_DATA.md describes windows, layout and meta.json.
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
