"""External (OOD / RealWorld) evaluation: the inference/ slices of every task -> dataset -> [sequence].

    python evaluate_external.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --data_path ./playground/MedSegDB/eval/OOD \
        --shift_type cross_site --metric dsc hd --device_ids 0 --batch_size 32

Writes external/<OOD|RealWorld>-<site|task>.md and .csv beside the model weight (the published
format), plus a details report, a DSC box plot and a gallery of the worst slices.
"""
from __future__ import annotations

from medsegx import runtime
from medsegx.args import eval_parser
from medsegx.evaluation import run_evaluation


def get_args_parser():
    return eval_parser("MedSegX external (OOD / RealWorld) evaluation", external=True)


def main(args) -> None:
    run_evaluation(args, external=True)


if __name__ == "__main__":
    runtime.launch(main, get_args_parser().parse_args())
