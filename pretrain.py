"""Pre-train MedSegX (ConMoAE + mask decoder) on MedSegDB's train/ split.

    python pretrain.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB \
        --device_ids 0 1 2 3 4 5 6 7 --num_epochs 30 --batch_size 1024 --lr 1e-3 --use_amp

Several --device_ids start one DDP worker per GPU; under torchrun the ranks come from torchrun.
An interrupted run continues exactly with --continue (or --resume <run>/model_latest.pth).
"""
from __future__ import annotations

from medsegx import runtime
from medsegx.args import train_parser
from medsegx.training import run_pretraining


def get_args_parser():
    return train_parser("Pre-train MedSegX on MedSegDB", finetune=False)


def main(args) -> None:
    run_pretraining(args)


if __name__ == "__main__":
    runtime.launch(main, get_args_parser().parse_args())
