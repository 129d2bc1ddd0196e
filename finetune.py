"""Fine-tune pre-trained MedSegX on each OOD site (task, dataset, and every sequence).

    python finetune.py --checkpoint ./playground/SAM --model_type vit_b \
        --data_path ./playground/MedSegDB/eval/OOD --shift_type cross_site --device_ids 0 \
        --num_epochs 30 --batch_size 64 --validation val \
        --resume ./playground/MedSegX/medsegx_vit_b.pth --lr 5e-5 --use_amp [--data_ratio 0.15 0.25 0.5 1.0]

Every site and data ratio is its own run from the pre-trained weights, in
<work_dir>/<task_name>/<shift_type>/<Task>/<Dataset>[/<Sequence>]/ratio_<r>/; the summary of
zero-shot vs fine-tuned DSC per site and ratio is written to <work_dir>/<task_name>/<shift_type>/summary.md|csv.
An interrupted fine-tuning continues with --continue (finished runs are kept).
The same command: ``medsegx finetune``; the recipe: medsegx/recipes/finetune.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS

COMMAND = COMMANDS["finetune"]


def get_args_parser():
    return COMMAND.parser(prog="finetune.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
