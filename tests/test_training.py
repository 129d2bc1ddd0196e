"""Training end to end on CPU with the tiny model: the real scripts, DDP through torchrun, exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsegx.losses import medsegx_loss, per_output_loss
from medsegx.optim import make_optimizer
from medsegx.recipes.common import batch_plan

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model_type", "vit_tiny", "--device_ids", "--num_workers", "0", "--threads", "1"]


def _run(cmd: list[str], cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_batch_plan():
    assert batch_plan(1024, 8, None) == (128, 1)
    assert batch_plan(1024, 8, 32) == (32, 4)
    assert batch_plan(64, 1, 24) == (22, 3)  # 3 x 22 = 66 would overshoot: logged, nearest equal split
    with pytest.raises(ValueError):
        batch_plan(2, 4, None)


def test_loss_is_min_over_outputs():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = (target * 20 - 10).expand(2, 1, 8, 8)
    bad = -good
    logits = torch.cat([bad, good, bad], dim=1)
    per = per_output_loss(logits, target)
    assert per.shape == (2, 3) and bool((per[:, 1] < per[:, 0]).all())
    loss, per_sample = medsegx_loss(logits, torch.zeros(2, 3), target)
    torch.testing.assert_close(per_sample, per[:, 1])
    torch.testing.assert_close(loss, per[:, 1].mean())
    # only the trained outputs count: the minimum over output 0 alone is output 0's loss
    torch.testing.assert_close(medsegx_loss(logits, torch.zeros(2, 3), target, outputs=(0,))[1], per[:, 0])
    torch.testing.assert_close(medsegx_loss(logits, torch.zeros(2, 3), target, outputs=(0, 2))[1], per[:, 0])


def test_loss_outputs_are_the_trained_tokens():
    """mask_outputs="all" makes every token a candidate, but the loss stays on the backbone's trained tokens:
    LiteMedSAM's token 0 (output 0), the paper's tokens 1..3 (outputs 1..3) for SAM backbones."""
    from medsegx.model.config import model_config

    assert model_config("lite").mask_outputs == "all" and model_config("lite").loss_outputs() == (0,)
    assert model_config("lite", mask_outputs="single").loss_outputs() == (0,)
    assert model_config("vit_b").loss_outputs() == (0, 1, 2)  # the paper's 3 outputs = tokens 1..3
    assert model_config("vit_b", mask_outputs="all").loss_outputs() == (1, 2, 3)
    assert [model_config("vit_tiny", mask_outputs=m).num_outputs() for m in ("multimask", "single", "all")] == [3, 1, 4]


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adapter = torch.nn.Linear(3, 3)
        self.mask_decoder = torch.nn.Linear(3, 2)


def _optim_args(**kw):
    import argparse
    base = dict(lr=1e-3, decoder_lr=None, weight_decay=0.01, l2sp=0.0, freeze_decoder=False)
    return argparse.Namespace(**{**base, **kw})


def test_l2sp_pulls_the_decoder_toward_its_start(tmp_path):
    torch.manual_seed(0)
    model = _Toy()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, _optim_args(l2sp=20.0, decoder_lr=1e-2))
    names = [g["name"] for g in opt.param_groups]
    assert names == ["adapters", "decoder"] and opt.param_groups[1]["weight_decay"] == 0.0
    with torch.no_grad():
        model.mask_decoder.weight.add_(1.0)  # a drift of 1 everywhere
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decays act
    opt.step()
    # decoupled L2-SP: p <- p - lr * l2sp * (p - p0) = p0 + (1 - 1e-2 * 20)
    torch.testing.assert_close(model.mask_decoder.weight, start["mask_decoder.weight"] + 0.8)
    torch.testing.assert_close(model.mask_decoder.bias, start["mask_decoder.bias"])
    # the adapters keep AdamW's decay toward zero
    torch.testing.assert_close(model.adapter.weight, start["adapter.weight"] * (1 - 1e-3 * 0.01))

    # the anchor is in the state dict (tensors only: loads with weights_only) and survives a resume
    torch.save(opt.state_dict(), tmp_path / "opt.pth")
    fresh = make_optimizer(model, _optim_args(l2sp=20.0, decoder_lr=1e-2))  # its anchor: today's weights
    fresh.load_state_dict(torch.load(tmp_path / "opt.pth", weights_only=True))
    torch.testing.assert_close(fresh.param_groups[1]["anchor"][0], start["mask_decoder.weight"])

    # off by default: the decoder decays toward zero like the rest
    plain = make_optimizer(_Toy(), _optim_args())
    assert "anchor" not in plain.param_groups[1] and plain.param_groups[1]["weight_decay"] == 0.01


def test_pretrain_one_epoch_on_real_slices(real_db, tmp_path):
    _run([sys.executable, "pretrain.py", *TINY, "--data_path", str(real_db / "train"),
          "--val_path", str(real_db / "eval" / "ID"), "--num_epochs", "1", "--batch_size", "8",
          "--work_dir", str(tmp_path), "--task_name", "run"])
    out = tmp_path / "run"
    for name in ("model_latest.pth", "model_best.pth", "model_lowest.pth", "history.jsonl", "curves.png",
                 "run_info.json", "log.txt"):
        assert (out / name).exists(), name
    history = [json.loads(line) for line in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert history[0]["epoch"] == 1 and history[0]["samples"] == 64 and 0 <= history[0]["val_dsc"] <= 1
    assert any((out / "tensorboard").iterdir())
    ckpt = torch.load(out / "model_latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["config"]["model_type"] == "vit_tiny"
    assert json.loads((out / "run_info.json").read_text(encoding="utf-8"))["git"]


def test_pretrain_without_validation(real_db, tmp_path):
    """--val_path none: eval/ID beside train/ is NOT used; no model_best.pth, the last epoch's weights stand."""
    _run([sys.executable, "pretrain.py", *TINY, "--data_path", str(real_db / "train"), "--val_path", "none",
          "--num_epochs", "1", "--max_steps", "2", "--batch_size", "8", "--work_dir", str(tmp_path),
          "--task_name", "run"])
    out = tmp_path / "run"
    assert (out / "model_latest.pth").exists() and not (out / "model_best.pth").exists()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert history[0]["steps"] == 2 and "val_dsc" not in history[0]


def test_ddp_two_processes_equal_one_process(real_db, tmp_path):
    common = [*TINY, "--data_path", str(real_db / "train"), "--val_path", str(real_db / "eval" / "ID"),
              "--num_epochs", "1", "--max_steps", "1", "--batch_size", "4", "--adapter_dropout", "0",
              "--work_dir", str(tmp_path)]
    _run([sys.executable, "pretrain.py", *common, "--task_name", "single"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "pretrain.py", *common, "--task_name", "ddp"])
    for name in ("single", "ddp"):
        ckpt = torch.load(tmp_path / name / "model_latest.pth", map_location="cpu", weights_only=False)
        assert ckpt["step"] == 1
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2
    single, ddp = _weights(tmp_path / "single" / "model_latest.pth"), _weights(tmp_path / "ddp" / "model_latest.pth")
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8) the last bits of the
    # gradient, which differ between one batch of 4 and an all-reduced mean of two batches of 2, move
    # the update by a few percent of lr. Every weight agrees within 2% of lr (2e-5), nearly all exactly.
    diffs = torch.cat([(ddp[key] - single[key]).abs().flatten() for key in single])
    assert float(diffs.max()) <= 0.02 * 1e-3, float(diffs.max())
    assert float((diffs <= 1e-6).float().mean()) >= 0.99


def test_resume_gives_the_uninterrupted_weights(real_db, tmp_path):
    # with L2-SP on, so the decoder's anchor (its weights at the start of the first run) must survive too
    common = [*TINY, "--data_path", str(real_db / "train"), "--val_path", str(real_db / "eval" / "ID"),
              "--batch_size", "16", "--max_train_slices", "32", "--l2sp", "50", "--work_dir", str(tmp_path)]
    _run([sys.executable, "pretrain.py", *common, "--num_epochs", "2", "--task_name", "full"])
    _run([sys.executable, "pretrain.py", *common, "--num_epochs", "1", "--task_name", "part"])
    _run([sys.executable, "pretrain.py", *common, "--num_epochs", "2", "--task_name", "part",
          "--resume", str(tmp_path / "part" / "model_latest.pth")])
    full, resumed = _weights(tmp_path / "full" / "model_latest.pth"), _weights(tmp_path / "part" / "model_latest.pth")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    assert torch.load(tmp_path / "part" / "model_latest.pth", weights_only=False)["epoch"] == 2


def test_finetune_data_ratios_summary(real_db, tmp_path):
    _run([sys.executable, "finetune.py", *TINY, "--data_path", str(real_db / "eval" / "OOD"),
          "--shift_type", "cross_task", "--num_epochs", "1", "--batch_size", "4", "--data_ratio", "0.5", "1.0",
          "--work_dir", str(tmp_path), "--task_name", "ft"])
    out = tmp_path / "ft" / "cross_task"
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "US_FetalHead/HC18" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| US_FetalHead")]
    assert len(rows) == 2  # one per data ratio
    assert (out / "summary.csv").exists()
    assert (out / "US_FetalHead" / "HC18" / "ratio_0.5" / "model_latest.pth").exists()


def test_vit_b_training_step_on_cpu():
    from medsegx.model.build import build_sam256
    from medsegx.model.config import model_config
    from medsegx.model.freeze import apply_freeze_policy

    torch.manual_seed(0)
    model = build_sam256(model_config("vit_b"))
    apply_freeze_policy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    image = torch.rand(2, 3, 256, 256) * 255
    box = torch.tensor([[40.0, 40.0, 200.0, 180.0], [60.0, 30.0, 120.0, 220.0]])
    label = torch.zeros(2, 1, 256, 256)
    label[0, :, 40:180, 40:200] = 1
    label[1, :, 30:220, 60:120] = 1
    out = model(image, box, torch.tensor([2, 7]), torch.tensor([[1, 4, 17, 59], [1, 5, 27, 82]]))
    loss, _ = medsegx_loss(out.masks, out.iou_pred, label)
    loss.backward()
    before = model.mask_decoder.mask_tokens.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.mask_decoder.mask_tokens.weight)


@pytest.mark.parametrize("val_after, kept", [(0.70, "start"), (0.90, "fine-tuned")])
def test_finetune_ships_the_better_of_start_and_finetuned(tmp_path, monkeypatch, val_after, kept):
    """model_final.pth is the fine-tuned model only when the site's validation split says it is better."""
    import argparse

    from medsegx.model.build import build_model
    from medsegx.model.checkpoint import checkpoint_state, save_checkpoint
    from medsegx.recipes import finetune as ft

    start_model, tuned_model = build_model("vit_tiny"), build_model("vit_tiny")
    with torch.no_grad():
        tuned_model.mask_decoder.mask_tokens.weight.add_(1.0)
    init = checkpoint_state(start_model)
    trained = tmp_path / "run" / "model_best.pth"
    save_checkpoint(trained, tuned_model)
    scores = {("test", "start"): 0.60, ("test", "tuned"): 0.65, ("test", None): 0.50,
              ("val", "start"): 0.80, ("val", "tuned"): val_after}

    def fake_score(args, records, weights):
        who = None if weights is None else ("start" if weights is init else "tuned")
        return {"dsc": scores[(records, who)], "dsc_iou": scores[(records, who)], "n": 3}

    class Pool:
        def subset(self, ratio, seed):
            return [0, 1]

    monkeypatch.setattr(ft, "_score", fake_score)
    monkeypatch.setattr(ft, "train_run", lambda *a, **k: {"files": {"best": trained, "latest": trained}})
    args = argparse.Namespace(data_ratio=[1.0], resume_run=False, seed=0)
    plan = {"site": "T/D", "key": ("T", "D"), "test": "test", "val": "val", "train_pool": Pool()}
    (row,) = ft._finetune_site(args, plan, init, tmp_path / "out")
    assert row["kept"] == kept and row["finetuned_dsc"] == 0.65 and row["zero_shot_dsc"] == 0.60
    assert row["final_dsc"] == (0.60 if kept == "start" else 0.65) and row["backbone_dsc"] == 0.50
    final = torch.load(row["checkpoint"], weights_only=True)["model"]
    expected = (start_model if kept == "start" else tuned_model).mask_decoder.mask_tokens.weight
    torch.testing.assert_close(final["mask_decoder.mask_tokens.weight"], expected.detach())
    assert ("starting weights are kept" in row["why"]) == (kept == "start")
