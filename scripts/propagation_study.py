"""3-D DSC of one-box prompts on a real volume: the same box on every slice against propagation.

Every labelled structure of a volume that one box can prompt (enough voxels, one connected piece)
gets its tight 3-D box from the label, as a user would draw it; the model then segments it with
(a) the box on every slice of its range, (b) propagation with each tested growth of the neighbour's
box (0 = the old chain of tight boxes). Each object is scored on its own mask (3-D DSC against the
label, the whole volume). Prints a Markdown table.

    python scripts/propagation_study.py [--image CT --label LABEL --names labels.json] [--grow 0 3 5 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
VOLUMES = REPO.parent / "shared" / "data" / "volumes"


def prompt_objects(label: np.ndarray, names: dict[str, str], min_voxels: int, min_piece: float):
    """(value, name, box x0 y0 z0 x1 y1 z1) of every structure a single box can prompt."""
    objects = []
    for value in np.unique(label[label > 0]).tolist():
        mask = label == value
        count = int(mask.sum())
        pieces, n = ndimage.label(mask)
        largest = np.bincount(pieces.ravel())[1:].max() if n else 0
        if count < min_voxels or largest < min_piece * count:
            continue
        zs, ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max()))
        # a viewer's prompt: the box drawn on the slice of largest section, with the object's z range
        seed = int(np.argmax(mask.sum(axis=(1, 2))))
        sy, sx = np.nonzero(mask[seed])
        drawn = (int(sx.min()), int(sy.min()), box[2], int(sx.max()), int(sy.max()), box[5])
        objects.append((int(value), names.get(str(value), str(value)), box, drawn, seed))
    return objects


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, default=VOLUMES / "ct_abdomen_small.nii.gz")
    p.add_argument("--label", type=Path, default=VOLUMES / "ct_abdomen_small_label.nii.gz")
    p.add_argument("--names", type=Path, default=VOLUMES / "labels.json",
                   help="JSON value -> name (or the shared labels.json); names are the tasks")
    p.add_argument("--modality", default="CT")
    p.add_argument("--model_type", default="lite")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--model_weight", default=None)
    p.add_argument("--grow", type=int, nargs="+", default=[0, 3, 5, 8])
    p.add_argument("--min_voxels", type=int, default=300)
    p.add_argument("--min_piece", type=float, default=0.95, help="share of voxels in the largest connected piece")
    p.add_argument("--drawn", action="store_true",
                   help="also: the box drawn on the slice of largest section only (z: the object's range), "
                        "propagation seeded there (as a viewer prompts)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for path in (args.image, args.label, args.names):
        if not path.exists():
            print(f"error: {path} not found", file=sys.stderr)
            return 2

    import torch

    from medsegx.inference import Segmenter
    from medsegx.inference.case import PredictOptions, predict_case, read_case_image
    from medsegx.inference.prompts import ObjectPrompt
    from medsegx.inference.runner import compose_labels
    from medsegx.metrics import dice

    if args.threads:
        torch.set_num_threads(args.threads)
    names = json.loads(args.names.read_text())
    names = names.get(args.label.name, names).get("labels", names)
    image = read_case_image(args.image)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(args.label)))
    objects = prompt_objects(label, names, args.min_voxels, args.min_piece)
    bounding = [ObjectPrompt(label=1 + i % 255, task=o[1], box=o[2]) for i, o in enumerate(objects)]
    drawn = [ObjectPrompt(label=1 + i % 255, task=o[1], box=o[3], seed=o[4]) for i, o in enumerate(objects)]
    seg = Segmenter.load(args.model_type, checkpoint=args.checkpoint, weights=args.model_weight, device="cpu")

    def run(propagate: bool, grow: int, prompts=bounding) -> tuple[list[float], float]:
        opts = PredictOptions(modality=args.modality, propagate=propagate, propagate_grow=grow)
        t0 = time.perf_counter()
        pred = predict_case(seg.runner, "study", image, args.image, prompts, opts, progress=False)
        seconds = time.perf_counter() - t0
        scores = []
        for (value, *_), obj, res in zip(objects, pred.objects, pred.results):
            own = compose_labels(pred.stack, [obj], [res]) > 0
            ref = pred.stack.to_canonical(label == value)
            scores.append(float(dice(own[None], ref[None], spatial_dims=3)[0]))
        return scores, seconds

    columns = {"every slice": run(False, 0)}
    for grow in args.grow:
        columns[f"propagate, grow {grow}"] = run(True, grow)
    if args.drawn:
        columns[f"drawn on one slice, seeded, grow {args.grow[-1]}"] = run(True, args.grow[-1], drawn)
    header = ["structure", "voxels", "slices", *columns]
    print(f"# One 3-D box per structure: {args.image.name}, {args.model_type}"
          f"{' + ' + Path(args.model_weight).name if args.model_weight else ' zero-shot'}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for j, (value, name, box, *_) in enumerate(objects):
        row = [name, str(int((label == value).sum())), str(box[5] - box[2] + 1)]
        row += [f"{scores[j]:.4f}" for scores, _ in columns.values()]
        print("| " + " | ".join(row) + " |")
    means = [f"**{np.mean(scores):.4f}**" for scores, _ in columns.values()]
    print(f"| mean of {len(objects)} | | | " + " | ".join(means) + " |")
    print("| seconds | | | " + " | ".join(f"{s:.0f}" for _, s in columns.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
