"""Internal (in-distribution) evaluation: every slice of eval/ID, walked dataset -> task -> [sequence].

    python evaluate_internal.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --data_path ./playground/MedSegDB/eval/ID \
        --metric dsc hd --device_ids 0 --batch_size 32

Writes internal/ID.md and internal/ID.csv beside the model weight (the published format), plus
ID_details.md, a DSC box plot and a gallery of the worst slices.
The same command: ``medsegx evaluate-internal``; the recipe: medsegx/recipes/evaluate.py.
"""
from __future__ import annotations

from medsegx.cli import COMMANDS, before_exit

COMMAND = COMMANDS["evaluate-internal"]


def get_args_parser():
    return COMMAND.parser(prog="evaluate_internal.py")


def main(args):
    return COMMAND.run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    before_exit()
