"""External evaluation: the inference/ slices of eval/OOD or eval/RealWorld, cross-site or cross-task.

    python evaluate_external.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --data_path ./playground/MedSegDB/eval/OOD \
        --shift_type cross_site --metric dsc hd --device_ids 0 --batch_size 32

Writes external/<OOD|RealWorld>-<site|task>.md|csv beside the model weight (the published format),
plus the details report and figures.
The same command: ``medsegx evaluate-external``; the recipe: medsegx/recipes/evaluate.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS, before_exit

COMMAND = COMMANDS["evaluate-external"]


def get_args_parser():
    return COMMAND.parser(prog="evaluate_external.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    before_exit()
