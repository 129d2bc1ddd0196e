"""Parity with the published implementation on ../shared/reference/tiny_parity.

The fixture holds a tiny MedSegX of the published architecture in both file
formats (Meta's SAM state_dict and the MedSegX checkpoint), the batch of the
14 example slices, and what the published code computed. Both the stock
segment-anything path and the fast path must reproduce it.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from medsegx.model import build_model, model_config


def _fixture(tiny_parity_dir):
    spec = importlib.util.spec_from_file_location("tiny_parity_fixture", tiny_parity_dir / "load_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data, label, extra = module.load_inputs(str(tiny_parity_dir / "inputs.pt"))
    outputs = module.load_outputs(str(tiny_parity_dir / "outputs.pt"))
    return data, label, extra, outputs


@pytest.fixture(scope="module")
def fixture(tiny_parity_dir):
    return _fixture(tiny_parity_dir)


def test_vit_tiny_is_the_fixture_architecture(tiny_parity_dir):
    ref = json.loads((tiny_parity_dir / "config.json").read_text(encoding="utf-8"))
    cfg = model_config("vit_tiny")
    enc = ref["image_encoder"]
    assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads) == (
        enc["embed_dim"], enc["depth"], enc["num_heads"])
    assert list(cfg.encoder_global_attn_indexes) == enc["global_attn_indexes"]
    assert cfg.prompt_embed_dim == ref["prompt_encoder"]["embed_dim"] == enc["out_chans"]
    assert cfg.decoder_mlp_dim == ref["two_way_transformer"]["mlp_dim"]
    assert cfg.iou_head_hidden_dim == ref["mask_decoder"]["iou_head_hidden_dim"]
    assert (cfg.adapter_bottleneck, cfg.adapter_embed_dim, cfg.num_experts) == (
        ref["medsegx"]["bottleneck_dim"], ref["medsegx"]["embedding_dim"], ref["medsegx"]["expert_num"])
    tables = ref["embedding_tables"]
    assert cfg.num_modalities == tables["modal_embed"]
    assert list(cfg.level_sizes) == [tables[f"organ_embed.{i}"] for i in range(5)]


@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
def test_outputs_match_published(tiny_parity_dir, fixture, fast):
    data, _, _, ref = fixture
    model = build_model(
        "vit_tiny",
        checkpoint=tiny_parity_dir / "sam_state_dict.pt",
        model_weight=tiny_parity_dir / "medsegx_params.pt",
        fast=fast,
    ).eval()
    organ = torch.stack(list(data["organ"]), dim=1)
    with torch.inference_mode():
        out = model(data["img"], data["box"], data["modal"], organ)
        embeddings, _ = model.image_encoder(model.preprocess(data["img"]), data["modal"], organ)

    # full logits of the slices stored whole
    idx = ref["mask_logits_full"]["indices"]
    torch.testing.assert_close(out.masks[idx], ref["mask_logits_full"]["logits"], atol=1e-4, rtol=0)
    # logits of every slice at the sampled pixels
    yx = ref["mask_logits_sampled"]["yx"]
    sampled = out.masks[:, :, yx[:, 0], yx[:, 1]]
    torch.testing.assert_close(sampled, ref["mask_logits_sampled"]["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.iou_pred, ref["iou_pred"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.gates, ref["expert_gates"], atol=1e-5, rtol=0)
    emb_idx = ref["image_embedding"]["indices"]
    torch.testing.assert_close(embeddings[emb_idx], ref["image_embedding"]["value"], atol=1e-4, rtol=0)

    # thresholded masks identical wherever the reference is not within 1e-4 of zero
    masks = torch.sigmoid(out.masks) > 0.5
    ref_masks = ref["mask_binary"]
    assert masks.shape == ref_masks.shape
    decided = torch.ones_like(ref_masks)
    full_ref = ref["mask_logits_full"]["logits"]
    decided[idx] = full_ref.abs() > 1e-4
    disagree = (masks != ref_masks) & decided
    # pixels without a stored reference logit: tolerate only where our own logit is that close to zero
    disagree &= ~(out.masks.abs() <= 1e-4)
    assert int(disagree.sum()) == 0


def test_prompt_and_context_embeddings_match(tiny_parity_dir, fixture):
    data, _, _, ref = fixture
    model = build_model("vit_tiny", checkpoint=tiny_parity_dir / "sam_state_dict.pt",
                        model_weight=tiny_parity_dir / "medsegx_params.pt").eval()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=None, boxes=data["box"], masks=None)
        enc = model.image_encoder
        modal = enc.modal_embed(data["modal"])
        organ = [enc.organ_embed[0](torch.zeros_like(data["modal"]))] + [
            enc.organ_embed[i + 1](o) for i, o in enumerate(data["organ"])]
    torch.testing.assert_close(sparse, ref["sparse_embeddings"], atol=1e-5, rtol=0)
    torch.testing.assert_close(dense[:1], ref["dense_embeddings_first"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.prompt_encoder.get_dense_pe(), ref["dense_pe"], atol=1e-5, rtol=0)
    torch.testing.assert_close(modal, ref["modal_embed"], atol=0, rtol=0)
    torch.testing.assert_close(torch.stack(organ), ref["organ_embeds"], atol=0, rtol=0)
