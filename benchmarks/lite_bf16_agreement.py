"""Agreement of the lite model's masks under bf16 autocast (``--use_amp``) with its fp32 masks.

For every slice of a MedSegDB tree (default: the real slices under ``../shared/data/MedSegDB-real``,
``train/`` and ``eval/``) whose label is not empty: the tight box of the label (the evaluation's
prompt), the LiteMedSAM backbone with its adapters at zero (zero-shot), the fast path, and the
whole model (encoder + decoder) once in fp32 and once under ``torch.autocast("cpu", bfloat16)``.
Printed per slice: the DSC between the fp32 and the bf16 mask of each of the 4 outputs (LiteMedSAM's
token 0 and MedSegX's three multimask outputs, sigmoid > 0.5); at the end the smallest and the mean.
Slices that are not 256x256 are resized as the dataset does (antialiased bilinear, box scaled).

    python benchmarks/lite_bf16_agreement.py                      # all real slices (~30 s each on a CPU
                                                                  # without native bf16, ~1 h)
    python benchmarks/lite_bf16_agreement.py --limit 12 --no_fast # the stock modules instead
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from medsegx.model.lite import build_lite  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "MedSegDB-real")
    p.add_argument("--limit", type=int, default=0, help="every k-th slice so that about this many remain (0: all)")
    p.add_argument("--no_fast", action="store_true", help="the stock TinyViT modules instead of the fast path")
    p.add_argument("--threads", type=int, default=1)
    return p


def slice_input(image_path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Image ``1 x 3 x 256 x 256`` (0..255) and the label's tight box in the 256 grid; None for an empty label."""
    image = np.load(image_path)
    label = np.load(str(image_path).replace("npy_imgs", "npy_gts")) > 0
    ys, xs = np.nonzero(label)
    if len(ys) == 0:
        return None
    h, w = label.shape
    tensor = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    if (h, w) != (256, 256):
        tensor = F.interpolate(tensor, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    sx, sy = 256 / w, 256 / h
    box = torch.tensor([[xs.min() * sx, ys.min() * sy, xs.max() * sx, ys.max() * sy]], dtype=torch.float32)
    return tensor, box


def masks(model, image, box, amp: bool) -> torch.Tensor:
    """The 4 masks ``4 x 256 x 256`` (token 0, then multimask tokens 1..3)."""
    context = (torch.tensor([0]), torch.tensor([[1, 1, 1, 1]]))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        emb, _ = model.encode(image, *context)
        out = [model.decode(emb, box, multimask_output=multi)[0] for multi in (False, True)]
    return torch.cat(out, 1)[0].float() > 0


def dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a.flatten(1).sum(1) + b.flatten(1).sum(1)
    inter = (a & b).flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total, dtype=torch.float32))


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = build_lite(fast=not args.no_fast).eval()
    files = sorted(args.root.rglob("npy_imgs/*.npy"))
    if args.limit:
        files = files[:: max(1, len(files) // args.limit)]
    print(machine_header(), flush=True)
    print(f"# {len(files)} slices under {args.root}; {'stock' if args.no_fast else 'fast'} path, "
          f"threads={torch.get_num_threads()}, ", flush=True)
    scores = []
    for path in files:
        item = slice_input(path)
        if item is None:
            continue
        image, box = item
        t0 = time.perf_counter()
        d = dice(masks(model, image, box, False), masks(model, image, box, True))
        scores.append(d)
        print(f"{path.relative_to(args.root)}  DSC fp32 vs bf16 (token 0, 1, 2, 3): "
              f"{' '.join(f'{v:.4f}' for v in d.tolist())}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    all_scores = torch.stack(scores)
    print(f"slices {len(scores)}: smallest DSC {all_scores.min():.4f} (per output "
          f"{' '.join(f'{v:.4f}' for v in all_scores.min(0).values.tolist())}), mean {all_scores.mean():.4f}, "
          f"slices with an output below 0.99: {int((all_scores.min(1).values < 0.99).sum())}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
