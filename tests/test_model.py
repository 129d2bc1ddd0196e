"""Model composition, freeze policy and checkpoint I/O."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsegx.model import (
    CheckpointError,
    ConMoAE,
    build_model,
    check_all_trainable_used,
    count_parameters,
    load_medsegx_weights,
    load_sam_checkpoint,
    save_checkpoint,
)
from medsegx.model.checkpoint import medsegx_keys, resolve_sam_checkpoint, torch_load


def _batch(n=2, size=256):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, 3, size, size, generator=g) * 255
    box = torch.tensor([[30.0, 40.0, 150.0, 160.0], [10.0, 20.0, 100.0, 200.0]])[:n]
    modal = torch.tensor([2, 7])[:n]
    organ = torch.tensor([[1, 4, 17, 59], [1, 5, 27, 82]])[:n]
    return image, box, modal, organ


def _randomise_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_tiny_forward_shapes():
    model = build_model("vit_tiny").eval()
    out = model(*_batch())
    assert out.masks.shape == (2, 3, 256, 256)
    assert out.iou_pred.shape == (2, 3)
    assert out.gates.shape == (2, 2, 4)  # (adapted blocks, B, E)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(2, 2))
    every = build_model("vit_tiny", mask_outputs="all").eval()
    every.load_state_dict(model.state_dict())
    both = every(*_batch())
    assert both.masks.shape == (2, 4, 256, 256) and both.iou_pred.shape == (2, 4)
    torch.testing.assert_close(both.masks[:, 1:], out.masks)  # tokens 1..3 are the paper's outputs
    torch.testing.assert_close(both.iou_pred[:, 1:], out.iou_pred)


def test_zero_initialised_adapters_are_the_backbone():
    model = build_model("vit_tiny").eval()
    _randomise_(model.image_encoder.blocks)  # perturbs adapter down/up as well
    for block in model.image_encoder.blocks:
        torch.nn.init.zeros_(block.mlp.adapter_up[0].weight)
        for up in block.mlp.adapter_up:
            torch.nn.init.zeros_(up.weight)
            torch.nn.init.zeros_(up.bias)
    x = torch.randn(2, 16, 16, 32)
    ctx_model = model.image_encoder
    from medsegx.model.conmoae import embed_context

    ctx = embed_context(ctx_model.modal_embed, ctx_model.organ_embed, torch.tensor([1, 2]), torch.tensor([[1, 4, 17, 59]] * 2))
    for block in model.image_encoder.blocks:
        out, _ = block.mlp(x, ctx)
        torch.testing.assert_close(out, block.mlp.mlp(x))


@pytest.mark.parametrize("train", [False, True])
def test_batched_experts_equal_the_loop(train):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 24))
    adapter = ConMoAE(mlp, 24, bottleneck_dim=6, embed_dim=5, num_experts=3, dropout=0.0)
    with torch.no_grad():
        for up in adapter.adapter_up:
            up.weight.normal_()
            up.bias.normal_()
    adapter.train(train)
    from medsegx.model.conmoae import AdapterContext

    ctx = AdapterContext(torch.randn(4, 2, 5), torch.randn(2, 5), torch.randn(2, 5))
    x = torch.randn(2, 7, 9, 24, requires_grad=True)
    results = []
    for batched in (False, True):
        adapter.batched_experts = batched
        adapter.zero_grad()
        out, gate = adapter(x, ctx)
        out.square().sum().backward()
        results.append((out.detach(), gate.detach(), [p.grad.clone() for p in adapter.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_freeze_policy_and_no_unused_trainable_parameters():
    model = build_model("vit_tiny")
    for name, p in model.named_parameters():
        expected = ("adapter" in name or "modal_embed" in name or "organ_embed" in name
                    or (name.startswith("mask_decoder.") and "iou_prediction_head" not in name))
        assert p.requires_grad == expected, name
    assert check_all_trainable_used(model) == []
    with_iou = build_model("vit_tiny", train_iou_head=True)
    assert all(p.requires_grad for n, p in with_iou.named_parameters() if "iou_prediction_head" in n)
    assert check_all_trainable_used(with_iou) == []


def test_round_trip_and_published_key_set(tmp_path, tiny_parity_dir):
    model = build_model("vit_tiny")
    _randomise_(model, seed=1)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, optimizer=None, epoch=3)
    saved = torch_load(path)
    published = torch_load(tiny_parity_dir / "medsegx_params.pt")
    assert set(saved["model"]) == set(published["model"])
    assert saved["epoch"] == 3 and saved["config"]["model_type"] == "vit_tiny"
    # rebuilt from the file alone
    again = build_model("vit_tiny", model_weight=path)
    state, state2 = model.state_dict(), again.state_dict()
    for key in medsegx_keys(model):
        assert torch.equal(state[key], state2[key]), key
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors_list_the_keys(tmp_path):
    model = build_model("vit_tiny")
    good = {k: v for k, v in model.state_dict().items() if k in set(medsegx_keys(model))}
    missing = dict(good)
    missing.pop("image_encoder.modal_embed.weight")
    with pytest.raises(CheckpointError, match="missing keys: image_encoder.modal_embed.weight"):
        load_medsegx_weights(model, {"model": missing})
    extra = dict(good, **{"image_encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys: image_encoder.bogus.weight"):
        load_medsegx_weights(model, {"model": extra})
    wrong = dict(good, **{"image_encoder.modal_embed.weight": torch.zeros(11, 8)})
    with pytest.raises(CheckpointError, match=r"modal_embed.weight: file \(11, 8\) vs model \(10, 8\)"):
        load_medsegx_weights(model, {"model": wrong})


def test_missing_sam_file_names_path_and_source(tmp_path):
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64.pth.*dl.fbaipublicfiles.com"):
        resolve_sam_checkpoint(tmp_path, "vit_b")
    with pytest.raises(CheckpointError, match=f"not found at {tmp_path}/sam_vit_b_01ec64.pth"):
        build_model("vit_b", checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("vit_tiny", checkpoint=tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def vit_b():
    return _vit_b_from_meta_layout()


def _vit_b_from_meta_layout():
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    meta = sam_model_registry["vit_b"]()  # Meta's 1024 layout
    with torch.no_grad():
        meta.image_encoder.pos_embed.normal_()
        for blk in meta.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
    from medsegx.model.build import build_sam256
    from medsegx.model.config import model_config
    from medsegx.model.freeze import apply_freeze_policy

    model = build_sam256(model_config("vit_b"))
    load_sam_checkpoint(model, meta.state_dict())
    apply_freeze_policy(model)
    return meta, model


def test_meta_1024_checkpoint_is_resized_as_published(vit_b):
    meta, model = vit_b
    pe = meta.image_encoder.pos_embed
    expected = F.interpolate(pe.permute(0, 3, 1, 2), (16, 16), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(model.image_encoder.pos_embed, expected)
    for i, (src, dst) in enumerate(zip(meta.image_encoder.blocks, model.image_encoder.blocks)):
        for axis in ("rel_pos_h", "rel_pos_w"):
            table = getattr(src.attn, axis)
            if i in (2, 5, 8, 11):
                assert table.shape == (127, 64)
                want = F.interpolate(table[None, None], (31, 64), mode="bilinear", align_corners=False)[0, 0]
            else:
                want = table  # window blocks keep 27 rows
            assert torch.equal(getattr(dst.attn, axis), want), (i, axis)
        assert torch.equal(dst.mlp.mlp.lin1.weight, src.mlp.lin1.weight)
    md, sd = model.mask_decoder, meta.mask_decoder
    assert torch.equal(md.transformer.layers[0].self_attn.q_proj.weight, sd.transformer.layers[0].self_attn.q_proj.weight)
    assert torch.equal(md.output_upscaling[3].weight, sd.output_upscaling[3].weight)
    assert not torch.equal(md.mask_tokens.weight, sd.mask_tokens.weight)  # left to the MedSegX file


def test_vit_b_forward_and_trainable_count(vit_b):
    _, model = vit_b
    model.eval()
    with torch.inference_mode():
        out = model(*_batch())
    assert out.masks.shape == (2, 3, 256, 256) and out.gates.shape == (12, 2, 4)
    counts = count_parameters(model)
    C, r, D, E = 768, 16, 16, 4
    per_block = E * (C * r + r) + E * (r * C + C) + (C * D + D) + 2 * (4 * D * E + E)
    assert counts["adapters"] == 12 * per_block
    assert counts["context_embeddings"] == (10 + 1 + 5 + 12 + 39 + 112) * D
    decoder = sum(p.numel() for n, p in model.mask_decoder.named_parameters() if "iou_prediction_head" not in n)
    assert counts["mask_decoder"] == decoder
    assert counts["trainable"] == counts["adapters"] + counts["context_embeddings"] + counts["mask_decoder"]


def test_segment_anything_modules_load_without_the_predictor_and_the_package_still_works_whole():
    """Building the networks takes segment-anything's modules only: its __init__ (predictor, torchvision,
    torch._dynamo) runs when a name of the package itself is first used, and then everything is there."""
    import subprocess
    import sys

    code = ("import sys; import medsegx.model.build, medsegx.model.fast; "
            "print(sorted({'torchvision', 'torch._dynamo', 'segment_anything.predictor'} & set(sys.modules))); "
            "from segment_anything import SamPredictor, sam_model_registry; import segment_anything; "
            "print(sorted(sam_model_registry), SamPredictor.__name__, callable(segment_anything.build_sam_vit_b)); "
            "print(hasattr(segment_anything, 'no_such_name'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["[]", "['default', 'vit_b', 'vit_h', 'vit_l'] SamPredictor True", "False"]
