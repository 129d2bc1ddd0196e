"""Loss against segmentation, per task: mean Dice + BCE of the model's first output (eval mode, tight
boxes, as the evaluation prompts) and mean DSC of that output, for zero-shot LiteMedSAM and each
checkpoint given. A falling training loss with a flat DSC means the training calibrated logits instead
of segmenting (docs/GENERALISATION.md).

    python scripts/probe_loss.py ../shared/data/MedSegDB-real/train run/model_latest.pth [...]
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medsegx.data.catalog import open_catalog  # noqa: E402
from medsegx.data.dataset import MedSegDataset  # noqa: E402
from medsegx.losses import per_output_loss  # noqa: E402
from medsegx.metrics import binarize, dice_per_mask  # noqa: E402
from medsegx.model import build_model  # noqa: E402


def main(data: str, weights: list[str]) -> None:
    loader = torch.utils.data.DataLoader(MedSegDataset(open_catalog(data, None), train=False), batch_size=8)
    for weight in [None, *weights]:
        model = build_model("lite", model_weight=weight).eval()
        per_dataset = collections.defaultdict(list)
        with torch.inference_mode():
            for batch in loader:
                out = model(batch["image"], batch["box"], batch["modal"], batch["organ"])
                loss = per_output_loss(out.masks, batch["label"])[:, 0]
                dsc = dice_per_mask(binarize(out.masks[:, :1]), binarize(batch["label"][:, 0]))["dsc"][:, 0]
                for name, item_loss, item_dsc in zip(batch["name"], loss.tolist(), dsc.tolist()):
                    per_dataset[str(name).split("/")[0]].append((item_loss, item_dsc))
        print(weight or "zero-shot LiteMedSAM")
        for dataset, values in sorted(per_dataset.items()):
            n = len(values)
            print(f"  {dataset:24s} n={n:3d}  loss {sum(v[0] for v in values) / n:.3f}  "
                  f"DSC {sum(v[1] for v in values) / n:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    main(sys.argv[1], sys.argv[2:])
