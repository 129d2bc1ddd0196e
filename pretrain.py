"""Pre-train MedSegX (ConMoAE + mask decoder) on MedSegDB's train/ split.

    python pretrain.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB \
        --device_ids 0 1 2 3 4 5 6 7 --num_epochs 30 --batch_size 1024 --lr 1e-3 --use_amp

Several --device_ids start one DDP worker per GPU; under torchrun the ranks come from torchrun.
An interrupted run continues exactly with --continue (or --resume <run>/model_latest.pth).
The same command: ``medsegx pretrain``; the recipe: medsegx/recipes/pretrain.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS

COMMAND = COMMANDS["pretrain"]


def get_args_parser():
    return COMMAND.parser(prog="pretrain.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
