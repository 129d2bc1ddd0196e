"""Pre-train MedSegX (ConMoAE + mask decoder) on MedSegDB's train/ split.

    python pretrain.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB \
        --device_ids 0 1 2 3 4 5 6 7 --num_epochs 30 --batch_size 1024 --lr 1e-3 --use_amp

Several --device_ids start one DDP worker per GPU; under torchrun the ranks come from torchrun.
"""
from __future__ import annotations

from pathlib import Path

from medsegx import runtime
from medsegx.args import train_parser
from medsegx.data.catalog import open_catalog
from medsegx.training import is_training_state, train_run


def get_args_parser():
    return train_parser("Pre-train MedSegX on MedSegDB", finetune=False)


def main(args) -> None:
    output_dir = Path(args.work_dir) / args.task_name
    runtime.setup(args, output_dir)
    train = open_catalog(args.data_path, splits=["train"], strict=args.strict, refresh=args.refresh_index)
    if args.max_train_slices and len(train) > args.max_train_slices:
        train = train.subset(args.max_train_slices / len(train), seed=args.seed)
    if args.val_path is None:  # MedSegDB/eval/ID beside the train/ folder, when present
        root = Path(args.data_path)
        candidates = [root / "eval" / "ID", root.parent / "eval" / "ID"]
        val_path = next((c for c in candidates if c.is_dir()), None)
    else:
        val_path = None if args.val_path.lower() == "none" else args.val_path
    val = open_catalog(val_path, strict=args.strict, refresh=args.refresh_index) if val_path else None
    resume = init = None
    if args.resume:
        if is_training_state(args.resume):
            resume = args.resume
        else:
            init = args.resume
    train_run(args, train, val, output_dir, init_weights=init, resume=resume)
    runtime.cleanup_distributed()


if __name__ == "__main__":
    runtime.launch(main, get_args_parser().parse_args())
