"""The fast image-encoder path equals the stock segment-anything modules.

fast=True (pad-aware windows, SDPA with the rel-pos mask, batched experts)
against fast=False (stock padded window partition and Attention, expert loop):
per block in float64 on odd geometries, ViT-B logits in float32 on real slices,
gradients of a small model in training mode, and runs under bf16 autocast.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Block

from medsegx.model.build import build_sam256
from medsegx.model.config import model_config
from medsegx.model.fast import fast_block_attention, stock_block_attention
from medsegx.model.freeze import apply_freeze_policy

REAL_SLICES = ("CHAOS/CT_Liver", "Kvasir-SEG/Endoscope_Polyp")


def _perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights where SAM/ConMoAE start at zero: rel-pos tables, qkv biases (the
    padding keys/values), adapters, context tables, pos_embed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "qkv.bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ("embed" in name and p.dim() <= 2) or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _real_batch(real_db):
    """Two real slices (one per dataset) with the box of their mask, as the model takes them."""
    images, boxes = [], []
    for folder in REAL_SLICES:
        gts = real_db / "train" / folder / "npy_gts"
        name = next(f.name for f in sorted(gts.glob("*.npy")) if np.load(f).any())
        gt = np.load(gts / name)
        img = np.load(real_db / "train" / folder / "npy_imgs" / name)
        assert img.shape == (256, 256, 3), f"{folder}/{name}: expected 256x256x3, got {img.shape}"
        ys, xs = np.nonzero(gt)
        images.append(torch.from_numpy(img).permute(2, 0, 1).float())
        boxes.append(torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32))
    modal = torch.tensor([0, 5])
    organ = torch.tensor([[1, 4, 17, 59], [0, 2, 8, 30]])
    return torch.stack(images), torch.stack(boxes), modal, organ


# --- one block, float64: exact up to rounding, any grid/window geometry ----------------------


@pytest.mark.parametrize(
    "grid,window",
    [(16, 14), (16, 0), (16, 4), (13, 6), (16, 20), (14, 14)],
    ids=["256-windows", "global", "divisible", "odd", "window>grid", "one-window"],
)
def test_block_attention_exact_float64(grid, window):
    torch.manual_seed(0)
    blk = Block(32, 2, use_rel_pos=True, window_size=window, input_size=(grid, grid)).double()
    _perturb_(blk)
    x = torch.randn(3, grid, grid, 32, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, grid, grid, 32, dtype=torch.float64)

    ref = stock_block_attention(blk, blk.norm1(x))
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), x)
    out = fast_block_attention(blk, blk.norm1(x))
    (grad,) = torch.autograd.grad((out * probe).sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    with torch.no_grad():  # the SDPA branch (no autograd)
        torch.testing.assert_close(fast_block_attention(blk, blk.norm1(x)), ref, atol=1e-12, rtol=0)


# --- ViT-B, float32, real slices -------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    model = build_sam256(model_config("vit_b")).eval()
    _perturb_(model)
    with torch.no_grad():  # logits of O(10) (SAM's fresh decoder gives O(0.1)): 1e-4 is then a tight bound
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def vit_b_stock(vit_b, real_db):
    """The stock fp32 outputs on the real batch (the reference of the ViT-B tests)."""
    batch = _real_batch(real_db)
    vit_b.image_encoder.set_fast(False)
    with torch.inference_mode():
        out = vit_b(*batch)
        embeddings, _ = vit_b.image_encoder(vit_b.preprocess(batch[0]), batch[2], batch[3])
    vit_b.image_encoder.set_fast(True)
    return batch, out, embeddings


@pytest.mark.slow
def test_vit_b_fast_equals_stock_fp32(vit_b, vit_b_stock):
    batch, ref, ref_embeddings = vit_b_stock
    vit_b.image_encoder.set_fast(True)
    with torch.inference_mode():
        out = vit_b(*batch)
        embeddings, _ = vit_b.image_encoder(vit_b.preprocess(batch[0]), batch[2], batch[3])
    assert ref.masks.abs().max() > 3  # the comparison is not of near-zero logits
    torch.testing.assert_close(embeddings, ref_embeddings, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.masks, ref.masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.iou_pred, ref.iou_pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.gates, ref.gates, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_vit_b_fast_under_bf16_autocast(vit_b, vit_b_stock):
    batch, ref, _ = vit_b_stock
    vit_b.image_encoder.set_fast(True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit_b(*batch)
    masks = out.masks.float()
    assert torch.isfinite(masks).all()
    # bf16 keeps ~3 significant digits through 12 blocks: a loose bound, relative to the logit scale.
    scale = ref.masks.abs().max()
    assert (masks - ref.masks).abs().max() < 0.1 * scale
    assert (masks - ref.masks).abs().mean() < 0.01 * scale
    assert ((masks > 0) == (ref.masks > 0)).float().mean() > 0.99


# --- training: gradients to the adapters, small model ----------------------------------------


def _small_model(fast: bool) -> torch.nn.Module:
    # vit_tiny with 3 blocks, window-global-window: block 0's adapters get their gradient
    # through both attention kinds. No adapter dropout so the two paths are comparable.
    cfg = model_config("vit_tiny", encoder_depth=3, encoder_global_attn_indexes=(1,), adapter_dropout=0.0)
    torch.manual_seed(0)
    model = build_sam256(cfg, fast=fast)
    _perturb_(model)
    apply_freeze_policy(model)
    return model.train()


def _train_step(model, batch, autocast_dtype=None):
    image, box, modal, organ = batch
    image = image.clone().requires_grad_(True)  # gradient through every block's attention too
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(image, box, modal, organ)
    (out.masks.float().sigmoid().mean() + out.iou_pred.float().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, image.grad


@pytest.fixture(scope="module")
def small_batch(real_db):
    return _real_batch(real_db)


def test_training_gradients_equal(small_batch):
    ref_out, ref_grads, ref_image_grad = _train_step(_small_model(fast=False), small_batch)
    out, grads, image_grad = _train_step(_small_model(fast=True), small_batch)
    torch.testing.assert_close(out.masks, ref_out.masks, atol=1e-4, rtol=0)
    assert grads.keys() == ref_grads.keys()
    assert any("blocks.0.mlp.adapter_down" in n for n in grads)
    for name, ref in ref_grads.items():
        assert ref is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref, atol=1e-6, rtol=1e-4, msg=name)
    scale = ref_image_grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(image_grad, ref_image_grad, atol=1e-4 * scale.item(), rtol=0)


def test_training_step_under_bf16_autocast(small_batch):
    _, ref_grads, _ = _train_step(_small_model(fast=True), small_batch)
    out, grads, _ = _train_step(_small_model(fast=True), small_batch, autocast_dtype=torch.bfloat16)
    assert out.masks.dtype in (torch.bfloat16, torch.float32)
    for name, ref in ref_grads.items():
        g = grads[name].float()
        assert torch.isfinite(g).all(), name
        if name.startswith("image_encoder."):  # the gradients that flow through encoder attention
            # loose: bf16 rounding, but the same direction as the fp32 gradient
            cos = torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0)
            assert cos > 0.95, (name, cos.item())
