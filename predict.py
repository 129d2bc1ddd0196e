"""Segment your own scans: a volume or image in, a mask in its original geometry out, boxes you give.

    python predict.py --model_type lite -i ct.nii.gz -o out/ --modality CT --task Liver --box 40 30 5 90 80 25
    python predict.py --model_type vit_b --checkpoint ./playground/SAM \
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth -i scans/ -o preds/ --modality CT \
        --prompts prompts.json --use_amp

Writes <case>.nii.gz (volumes) or <case>.png (2-D) and <case>.json into -o; see --help.
The same command: ``medsegx predict``; the recipe: medsegx/recipes/predict.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS

COMMAND = COMMANDS["predict"]


def get_args_parser():
    return COMMAND.parser(prog="predict.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
