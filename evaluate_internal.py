"""Internal (in-distribution) evaluation: every slice of eval/ID, walked dataset -> task -> [sequence].

    python evaluate_internal.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --data_path ./playground/MedSegDB/eval/ID \
        --metric dsc hd --device_ids 0 --batch_size 32

Writes internal/ID.md and internal/ID.csv beside the model weight (the published format), plus
ID_details.md, a DSC box plot and a gallery of the worst slices.
"""
from __future__ import annotations

from medsegx import runtime
from medsegx.args import eval_parser
from medsegx.evaluation import run_evaluation


def get_args_parser():
    return eval_parser("MedSegX internal (ID) evaluation", external=False)


def main(args) -> None:
    run_evaluation(args, external=False)


if __name__ == "__main__":
    runtime.launch(main, get_args_parser().parse_args())
