"""The neutral context: ``NEUTRAL_ROW`` at a level is embedded as zero on every backbone, and a task in
no tree reaches the model as that, from the folder name through the dataset to the forward pass."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsegx.data.catalog import open_catalog
from medsegx.data.dataset import MedSegDataset
from medsegx.data.taxonomy import NEUTRAL_ROW, UNKNOWN_TASK
from medsegx.model import build_model
from medsegx.model.conmoae import embed_context

N = NEUTRAL_ROW
# A slice of an unknown task, a rib (organ neutral) and one with every level known.
NEUTRAL = torch.tensor([[N, N, N, UNKNOWN_TASK], [2, 8, N, UNKNOWN_TASK], [1, 4, 17, 59]])
# The same contexts with row 0 standing in for each neutral level.
ROW_ZERO = NEUTRAL.clamp(min=0)


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, 256, 256, generator=g) * 255
    box = torch.tensor([[30.0, 40.0, 150.0, 160.0], [10.0, 20.0, 100.0, 200.0], [50.0, 60.0, 200.0, 210.0]])[:n]
    return image, box, torch.tensor([2, 2, 7])[:n]


def _randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter perturbed: the adapters (zero up projections) and the tables (zero rows) then act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _zero_row_zero_(encoder: torch.nn.Module) -> None:
    with torch.no_grad():
        for level in (1, 2, 3):
            encoder.organ_embed[level].weight[0].zero_()


def _check_neutral_is_zero_embedding(model: torch.nn.Module, n: int) -> None:
    image, box, modal = _inputs(n)
    with torch.no_grad():
        neutral = model(image, box, modal, NEUTRAL[:n])
        row_zero = model(image, box, modal, ROW_ZERO[:n])
        # the check is not vacuous: row 0 (head&neck / head / brain) is a real, different context
        assert not torch.allclose(neutral.masks[0], row_zero.masks[0])
        _zero_row_zero_(model.image_encoder)
        zeroed = model(image, box, modal, ROW_ZERO[:n])
    torch.testing.assert_close(neutral.masks, zeroed.masks, atol=0, rtol=0)
    torch.testing.assert_close(neutral.gates, zeroed.gates, atol=0, rtol=0)


def test_neutral_equals_zero_embeddings_vit():
    model = build_model("vit_tiny").eval()
    _randomise_(model)
    _check_neutral_is_zero_embedding(model, 3)


@pytest.mark.slow
def test_neutral_equals_zero_embeddings_lite():
    model = build_model("lite").eval()
    _randomise_(torch.nn.ModuleList(model.image_encoder.adapters))
    for table in [model.image_encoder.modal_embed, *model.image_encoder.organ_embed]:
        _randomise_(table, seed=1)
    _check_neutral_is_zero_embedding(model, 1)


def test_embed_context_neutral_rows():
    model = build_model("vit_tiny")
    encoder = model.image_encoder
    _randomise_(encoder.organ_embed)
    ctx = embed_context(encoder.modal_embed, encoder.organ_embed, torch.tensor([2, 2, 7]), NEUTRAL)
    assert ctx.organ_levels.shape == (4, 3, encoder.modal_embed.embedding_dim)
    assert torch.equal(ctx.organ_levels[0], encoder.organ_embed[0].weight[[0, 0, 0]])  # the root is always row 0
    assert not ctx.organ_levels[1:, 0].any()  # unknown task: body part, subregion and organ are zero
    assert ctx.organ_levels[1:3, 1].all() and not ctx.organ_levels[3, 1].any()  # rib: organ zero only
    for level in (1, 2, 3):
        assert torch.equal(ctx.organ_levels[level, 2], encoder.organ_embed[level].weight[NEUTRAL[2, level - 1]])
    assert torch.equal(ctx.task, encoder.organ_embed[4].weight[[UNKNOWN_TASK, UNKNOWN_TASK, 59]])
    # the sentinel is -1 only: any other negative index is an error, not a silent zero
    with pytest.raises(IndexError):
        embed_context(encoder.modal_embed, encoder.organ_embed, torch.tensor([2]), torch.tensor([[-2, 0, 0, 0]]))


def test_all_neutral_batch_trains_without_unused_parameters():
    """DDP needs every trainable parameter in the graph, also for a batch of unknown tasks only; the
    neutral levels give row 0 no gradient."""
    model = build_model("vit_tiny")
    _randomise_(model)
    image, box, modal = _inputs(2)
    organ = torch.tensor([[N, N, N, UNKNOWN_TASK]] * 2)
    model(image, box, modal, organ).masks.float().square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    for level in (1, 2, 3):
        assert not model.image_encoder.organ_embed[level].weight.grad.any()
    assert model.image_encoder.organ_embed[0].weight.grad.any()  # the root row still learns
    assert model.image_encoder.organ_embed[4].weight.grad[UNKNOWN_TASK].any()  # and the spare task row


def _write_pair(folder: Path, name: str) -> None:
    (folder / "npy_imgs").mkdir(parents=True, exist_ok=True)
    (folder / "npy_gts").mkdir(parents=True, exist_ok=True)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:30, 20:40] = 1
    np.save(folder / "npy_imgs" / name, np.full((64, 64, 3), 90, dtype=np.uint8))
    np.save(folder / "npy_gts" / name, mask)


def test_folder_to_forward(tmp_path):
    """Task folders of other naming schemes reach the model with their rows, neutral levels as -1."""
    for task in ("CT_NotAnOrgan", "CT_RibLeft9", "CT_kidney_left"):
        _write_pair(tmp_path / "MedSegDB" / "train" / "DS" / task, "casenum_1_sliceid_1.npy")
    catalog = open_catalog(tmp_path / "MedSegDB", use_cache=False)
    batch = next(iter(DataLoader(MedSegDataset(catalog), batch_size=3)))
    organ = {record.task_folder: tuple(record.organ) for record in catalog}
    assert organ == {"CT_NotAnOrgan": (N, N, N, UNKNOWN_TASK), "CT_RibLeft9": (2, 8, N, UNKNOWN_TASK),
                     "CT_kidney_left": (1, 4, 21, 65)}
    assert batch["organ"].dtype == torch.int64 and sorted(map(tuple, batch["organ"].tolist())) == sorted(organ.values())
    model = build_model("vit_tiny").eval()
    with torch.no_grad():
        out = model(batch["image"], batch["box"], batch["modal"], batch["organ"])
    assert out.masks.shape == (3, 3, 256, 256) and torch.isfinite(out.masks).all()
