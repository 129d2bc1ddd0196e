"""Context-gated decoder adapters (``ModelConfig.decoder_adapters``): exactly the backbone's decoder for a
task no training saw, for an unknown task and for the neutral context; trained only through the rows of the
tasks that train; recorded in checkpoints; reached by every caller of the decoder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsegx.data.taxonomy import NEUTRAL_ROW, UNKNOWN_TASK
from medsegx.model import build_model, save_checkpoint
from medsegx.model.freeze import apply_freeze_policy, is_trainable_name

REPO = Path(__file__).resolve().parents[1]
TRAINED = torch.tensor([1, 4, 17, 59])  # a context whose task row training moves
UNSEEN = torch.tensor([1, 5, 27, 82])  # a task whose row no training slice looked up
UNKNOWN = torch.tensor([NEUTRAL_ROW, NEUTRAL_ROW, NEUTRAL_ROW, UNKNOWN_TASK])
NEUTRAL_TASK = torch.tensor([1, 4, 17, NEUTRAL_ROW])


def _inputs(organ: list[torch.Tensor], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = len(organ)
    image = torch.rand(n, 3, 256, 256, generator=g) * 255
    x0 = torch.randint(0, 90, (n, 2), generator=g).float()
    box = torch.cat([x0, x0 + torch.randint(60, 150, (n, 2), generator=g).float()], dim=1)
    return image, box, torch.full((n,), 2), torch.stack(organ)


def _pair(model_type: str = "vit_tiny"):
    """The same network without and with decoder adapters (the shared weights equal; vit_tiny's random
    backbone from seed 0)."""
    torch.manual_seed(0)
    base = build_model(model_type, task_decoder=False).eval()  # the decoder adapters alone (lite has a task decoder
    adapted = build_model(model_type, decoder_adapters=True, task_decoder=False).eval()  # by default)
    result = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("decoder_adapters.") for k in result.missing_keys)
    return base, adapted


def _train_rows_(models, rows: list[int], seed: int = 1) -> None:
    """Give ``rows`` of the task table (and every encoder table row and adapter) trained-like values in
    every model, and the decoder adapters random ones: what pre-training leaves."""
    g = torch.Generator().manual_seed(seed)
    encoder_noise = {k: torch.randn(v.shape, generator=g) * 0.2
                     for k, v in models[0].state_dict().items()
                     if "adapter" in k or ".modal_embed." in k or ".organ_embed." in k}
    with torch.no_grad():
        for model in models:
            state = model.state_dict()
            for k, noise in encoder_noise.items():
                if k.startswith("image_encoder.organ_embed.4."):
                    keep = torch.zeros(noise.shape[0], dtype=torch.bool)
                    keep[rows] = True
                    state[k].copy_(torch.where(keep[:, None], noise, torch.zeros_like(noise)))
                else:
                    state[k].add_(noise)
        adapters = models[-1].decoder_adapters
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_untrained_unknown_and_neutral_tasks_get_exactly_the_backbone_decoder():
    base, adapted = _pair()
    contexts = [TRAINED, UNSEEN, UNKNOWN, NEUTRAL_TASK]
    with torch.no_grad():
        before, fresh = base(*_inputs(contexts)), adapted(*_inputs(contexts))
    # fresh tables: all rows zero, the adapted model is the backbone everywhere
    assert torch.equal(before.masks, fresh.masks) and torch.equal(before.iou_pred, fresh.iou_pred)
    _train_rows_([base, adapted], rows=[int(TRAINED[3])])
    with torch.no_grad():
        plain, gated = base(*_inputs(contexts)), adapted(*_inputs(contexts))
    assert not torch.equal(plain.masks[0], gated.masks[0]), "a trained task's row must reach the decoder"
    # same encoder either way; the decoder is bit for bit the backbone's for the other three
    assert torch.equal(plain.masks[1:], gated.masks[1:]) and torch.equal(plain.iou_pred[1:], gated.iou_pred[1:])


def test_only_the_rows_of_the_training_tasks_learn():
    _, adapted = _pair()
    apply_freeze_policy(adapted, train_decoder=False, train_encoder_adapters=False)
    adapted.train()
    image, box, modal, organ = _inputs([TRAINED, TRAINED])
    out = adapted(image, box, modal, organ)
    out.masks.float().square().mean().backward()
    task_grad = adapted.image_encoder.organ_embed[4].weight.grad
    assert task_grad[int(TRAINED[3])].abs().sum() > 0, "the experts start random so a zero row gets a gradient"
    others = torch.ones(task_grad.shape[0], dtype=torch.bool)
    others[int(TRAINED[3])] = False
    assert task_grad[others].abs().sum() == 0
    for name, p in adapted.named_parameters():
        if name.startswith("mask_decoder.") or (name.startswith("image_encoder.") and "adapter" in name):
            assert not p.requires_grad, name
    assert all(p.requires_grad for p in adapted.decoder_adapters.parameters())
    # a fixed encoder runs without autograd: no graph through it (the training step's cost is the decoder's)
    embeddings, _ = adapted.image_encoder(adapted.preprocess(image), modal, organ)
    assert embeddings.requires_grad
    with torch.set_grad_enabled(True):
        out = adapted(image, box, modal, organ)
    assert out.masks.requires_grad and not out.gates.requires_grad


def test_freeze_policy_names():
    assert is_trainable_name("decoder_adapters.tokens.0.adapter_up.weight", train_decoder=False,
                             train_encoder_adapters=False)
    assert not is_trainable_name("image_encoder.blocks.0.mlp.adapter_up.0.weight", train_encoder_adapters=False)
    assert is_trainable_name("image_encoder.organ_embed.4.weight", train_encoder_adapters=False)
    # the tables only the encoder reads stay with it
    assert not is_trainable_name("image_encoder.organ_embed.3.weight", train_encoder_adapters=False)
    assert not is_trainable_name("image_encoder.modal_embed.weight", train_encoder_adapters=False)
    assert is_trainable_name("image_encoder.blocks.0.mlp.adapter_up.0.weight")


def test_the_decoders_own_keys_stay_the_backbones():
    base, adapted = _pair()
    assert {k for k in adapted.state_dict() if not k.startswith("decoder_adapters.")} == set(base.state_dict())
    assert all(k.startswith("decoder_adapters.") and "adapter" in k.split(".")[-2] or "adapter_" in k
               for k in adapted.state_dict() if k.startswith("decoder_adapters."))


def test_checkpoint_records_the_architecture(tmp_path):
    _, adapted = _pair()
    _train_rows_([adapted], rows=[int(TRAINED[3])])
    path = tmp_path / "dec.pth"
    save_checkpoint(path, adapted)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert stored["config"]["decoder_adapters"] is True
    torch.manual_seed(0)  # the tiny backbone's random frozen weights are not in a MedSegX file
    rebuilt = build_model("vit_tiny", model_weight=path).eval()
    assert rebuilt.config.decoder_adapters and hasattr(rebuilt, "decoder_adapters")
    inputs = _inputs([TRAINED, UNSEEN])
    with torch.no_grad():
        assert torch.equal(adapted(*inputs).masks, rebuilt(*inputs).masks)
    # a file without the adapters cannot be read into a model that has them: a clear error, not zeros
    plain = tmp_path / "plain.pth"
    save_checkpoint(plain, build_model("vit_tiny"))
    with pytest.raises(Exception, match="missing keys: .*decoder_adapters"):
        build_model("vit_tiny", model_weight=plain, decoder_adapters=True)


def test_decode_needs_the_context_only_when_adapted():
    base, adapted = _pair()
    emb = torch.zeros(1, base.config.prompt_embed_dim, 16, 16)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0], [20.0, 30.0, 90.0, 120.0]])
    with torch.no_grad():
        base.decode(emb.expand(2, -1, -1, -1), box)
        with pytest.raises(ValueError, match="needs the slices' organ"):
            adapted.decode(emb.expand(2, -1, -1, -1), box)
        one = adapted.decode(emb.expand(2, -1, -1, -1), box, organ=TRAINED[None])
        two = adapted.decode(emb.expand(2, -1, -1, -1), box, organ=torch.stack([TRAINED, TRAINED]))
    assert torch.equal(one[0], two[0])
    _, routed = _task_pair()
    with torch.no_grad():
        emb2 = emb.expand(2, -1, -1, -1)
        torch.testing.assert_close(routed.decode(emb2, box)[0], base.decode(emb2, box)[0])  # nothing trained yet
        routed.task_decoder.mark_trained(TRAINED[3:])
        with pytest.raises(ValueError, match="needs the slices' organ"):
            routed.decode(emb2, box)


def test_the_servers_cached_model_passes_the_context():
    from medsegx.serve.cache import CachedModel, EmbeddingCache

    _, adapted = _pair()
    _train_rows_([adapted], rows=[int(TRAINED[3])])
    cached = CachedModel(adapted, EmbeddingCache(max_bytes=2**26))
    inputs = _inputs([TRAINED, UNSEEN])
    with torch.no_grad():
        assert torch.equal(cached(*inputs).masks, adapted(*inputs).masks)


@pytest.mark.slow
def test_lite_with_decoder_adapters_is_litemedsam_until_trained():
    base, adapted = _pair("lite")
    assert adapted.config.decoder_adapters and not base.config.decoder_adapters
    inputs = _inputs([TRAINED, UNKNOWN])
    with torch.no_grad():
        assert torch.equal(base(*inputs).masks, adapted(*inputs).masks)


def test_pretrain_flags_reach_the_checkpoint(real_db, tmp_path):
    cmd = [sys.executable, "pretrain.py", "--model_type", "vit_tiny", "--device_ids", "--num_workers", "0",
           "--threads", "1", "--data_path", str(real_db / "train"), "--val_path", "none", "--num_epochs", "1",
           "--max_steps", "2", "--batch_size", "4", "--work_dir", str(tmp_path), "--task_name", "run",
           "--decoder_adapters", "--freeze_decoder", "--freeze_encoder_adapters"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["config"]["decoder_adapters"] is True
    weights = ckpt["model"]
    # the encoder's experts stayed at their zero start; the task rows of the training slices moved
    assert all(not v.any() for k, v in weights.items() if k.startswith("image_encoder.") and "adapter_up" in k)
    assert weights["image_encoder.organ_embed.4.weight"].abs().sum(1).gt(0).sum() >= 1


# ----------------------------------------------------------------------------- the task decoder
def _task_pair(model_type: str = "vit_tiny"):
    torch.manual_seed(0)
    base = build_model(model_type, task_decoder=False).eval()  # lite has one by default
    torch.manual_seed(0)
    routed = build_model(model_type, task_decoder=True, train_decoder=False, train_encoder_adapters=False).eval()
    return base, routed


def _perturb_(module: torch.nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _decoded(model, inputs, embeddings=None):
    """(masks, iou) of ``model`` on ``inputs``; the lite model decodes the given image embeddings (its encoder is
    the same in every model here: one encoding serves them all)."""
    image, box, modal, organ = inputs
    if embeddings is None:
        out = model(*inputs)
        return out.masks, out.iou_pred
    return model.decode(embeddings[: len(box)], box, organ=organ)


@pytest.mark.parametrize("model_type", ["vit_tiny", pytest.param("lite", marks=pytest.mark.slow)])
def test_task_decoder_decodes_the_trained_tasks_only(model_type):
    base, routed = _task_pair(model_type)
    assert {k for k in routed.state_dict() if not k.startswith("task_decoder.")} == set(base.state_dict())
    trainable = {n for n, p in routed.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("task_decoder.decoder.") for n in trainable)
    contexts = [TRAINED, UNSEEN, UNKNOWN, NEUTRAL_TASK]
    inputs = _inputs(contexts)
    image, box, modal, organ = inputs
    with torch.no_grad():
        emb = base.encode(image, modal, organ)[0] if hasattr(base, "encode") else None
        assert torch.equal(_decoded(base, inputs, emb)[0], _decoded(routed, inputs, emb)[0]), \
            "starts as the backbone's decoder"
    routed.task_decoder.mark_trained(torch.tensor([int(TRAINED[3]), NEUTRAL_ROW, UNKNOWN_TASK]))  # only the first
    assert routed.task_decoder.trained_tasks.sum() == 1
    _perturb_(routed.task_decoder.decoder)
    with torch.no_grad():
        out_masks, out_iou = _decoded(routed, inputs, emb)
        plain_masks, plain_iou = _decoded(base, inputs, emb)
        alone_masks, _ = _decoded(routed, (image[:1], box[:1], modal[:1], organ[:1]), emb)
    # every other task: the backbone's decoder with all its outputs (run on the sub-batch of those boxes, so
    # equal up to the rounding of another batch size)
    torch.testing.assert_close(out_masks[1:], plain_masks[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_iou[1:], plain_iou[1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(out_masks[1:] > 0, plain_masks[1:] > 0)
    assert not torch.equal(out_masks[0], plain_masks[0])
    torch.testing.assert_close(out_masks[:1], alone_masks)  # a mixed batch routes per box
    if routed.config.loss_outputs() == (0,):  # lite: the trained token in every slot, nothing else to choose
        assert all(torch.equal(out_masks[0, 0], out_masks[0, k]) for k in range(out_masks.shape[1]))


def test_the_training_run_marks_its_tasks_and_the_checkpoint_keeps_them(real_db, tmp_path):
    cmd = [sys.executable, "pretrain.py", "--model_type", "vit_tiny", "--device_ids", "--num_workers", "0",
           "--threads", "1", "--data_path", str(real_db / "train"), "--val_path", "none", "--num_epochs", "1",
           "--max_steps", "2", "--batch_size", "4", "--work_dir", str(tmp_path), "--task_name", "run",
           "--task_decoder", "--freeze_decoder", "--freeze_encoder_adapters", "--lr", "1e-4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["config"]["task_decoder"] is True
    from medsegx.data.catalog import open_catalog

    tasks = {int(r.organ[-1]) for r in open_catalog(real_db / "train", cache_dir=tmp_path)}
    marked = set(ckpt["model"]["task_decoder.trained_tasks"].nonzero().flatten().tolist())
    assert marked == tasks and len(tasks) == 4
    weights = ckpt["model"]
    assert all(not v.any() for k, v in weights.items() if k.startswith("image_encoder.") and "adapter_up" in k)
    # the backbone's decoder stayed (not even stored differently), the task decoder moved
    torch.manual_seed(0)
    rebuilt = build_model("vit_tiny", model_weight=tmp_path / "run" / "model_latest.pth")
    assert rebuilt.config.task_decoder and int(rebuilt.task_decoder.trained_tasks.sum()) == 4
    assert any(not torch.equal(weights[f"task_decoder.decoder.{k}"], weights[f"mask_decoder.{k}"])
               for k in rebuilt.mask_decoder.state_dict())


def test_nothing_to_train_is_a_one_line_error(real_db, tmp_path):
    cmd = [sys.executable, "pretrain.py", "--model_type", "vit_tiny", "--device_ids", "--num_workers", "0",
           "--data_path", str(real_db / "train"), "--val_path", "none", "--num_epochs", "1", "--max_steps", "1",
           "--work_dir", str(tmp_path), "--task_name", "run", "--freeze_decoder", "--freeze_encoder_adapters"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "leaves nothing to train" in proc.stderr.strip().splitlines()[-1]


def test_a_training_set_of_unnamed_tasks_leaves_the_task_decoder_as_it_is():
    from types import SimpleNamespace

    from medsegx.errors import UserError
    from medsegx.recipes.common import mark_training_tasks

    records = lambda *organs: [SimpleNamespace(organ=tuple(int(v) for v in o)) for o in organs]  # noqa: E731
    _, routed = _task_pair()
    assert mark_training_tasks(routed, records(TRAINED, NEUTRAL_TASK)) is True  # mixed: DDP must look for unused
    assert routed.task_decoder.trained_tasks.sum() == 1
    assert all(p.requires_grad for n, p in routed.task_decoder.named_parameters() if "iou_prediction" not in n)
    _, routed = _task_pair()
    assert mark_training_tasks(routed, records(TRAINED)) is False
    _, routed = _task_pair()  # encoder fixed, neutral and unknown tasks only: nothing would learn
    with pytest.raises(UserError, match="nothing to train"):
        mark_training_tasks(routed, records(NEUTRAL_TASK, UNKNOWN))
    assert not routed.task_decoder.trained_tasks.any()
    assert not any(p.requires_grad for p in routed.task_decoder.parameters())
    _, routed = _task_pair()  # a fine-tune on one site's unnamed task: the task decoder learns it
    assert mark_training_tasks(routed, records(UNKNOWN, NEUTRAL_TASK), finetune=True) is True
    assert routed.task_decoder.trained_tasks.nonzero().flatten().tolist() == [UNKNOWN_TASK]
    adapted = build_model("vit_tiny", task_decoder=True, train_decoder=False)  # the encoder's ConMoAE still learns
    assert mark_training_tasks(adapted, records(NEUTRAL_TASK)) is False
    assert not any(p.requires_grad for p in adapted.task_decoder.parameters())
    assert any(p.requires_grad for n, p in adapted.named_parameters() if "adapter" in n)
