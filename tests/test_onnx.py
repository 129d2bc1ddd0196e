"""ONNX export (medsegx.model.onnx_export) and the onnxruntime backend (medsegx.model.onnx_runtime).

The tiny model (``vit_tiny``) with random adapters and context tables (so the gates depend on the
context rows) is exported once per module (~20 s); onnxruntime then has to give the torch model's
embeddings, gates, logits and masks at several batch sizes, and the same label maps through the
prediction pipeline. LiteMedSAM's export takes ~100 s on the 2-core machine: its real-size check is
docs/PERFORMANCE.md's ("ONNX backend"), not part of the suite.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import shared_path

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'medsegx[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install 'medsegx[onnx]')")

from medsegx import cli  # noqa: E402
from medsegx.errors import UserError  # noqa: E402
from medsegx.inference.segmenter import Segmenter  # noqa: E402
from medsegx.model import build_model  # noqa: E402
from medsegx.model.onnx_export import (  # noqa: E402
    DECODER_FILE,
    ENCODER_FILE,
    META_FILE,
    OnnxUnavailableError,
    _example_inputs,
    export_onnx,
    normalise,
)
from medsegx.model.onnx_runtime import OnnxModel, OnnxModelError, read_meta  # noqa: E402

# Logits this close to 0 may fall on either side of the threshold by float rounding alone.
THRESHOLD_BAND = 1e-4


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model("vit_tiny").eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name or name.startswith(("image_encoder.modal_embed", "image_encoder.organ_embed")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny_model()
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    meta = export_onnx(model, out, source={"model_type": "vit_tiny", "model_weight": None})
    return model, out, meta


def _masks_agree(got: torch.Tensor, ref: torch.Tensor) -> None:
    decided = ref.abs() > THRESHOLD_BAND
    assert decided.float().mean() > 0.99
    assert torch.equal((got > 0)[decided], (ref > 0)[decided])


def test_the_export_writes_two_graphs_and_a_json_that_describes_them(exported):
    model, out, meta = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([ENCODER_FILE, DECODER_FILE, META_FILE])
    on_disk = json.loads((out / META_FILE).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["model_type"] == "vit_tiny" and on_disk["input_size"] == 256
    assert on_disk["config"] == json.loads(json.dumps(model.config.to_dict()))
    assert on_disk["normalisation"]["kind"] == "mean_std"
    assert on_disk["torch"] == torch.__version__ and on_disk["opset"] == 18
    enc, dec = on_disk["encoder"], on_disk["decoder"]
    assert list(enc["inputs"]) == ["image", "modal", "organ"] and list(enc["outputs"]) == ["embeddings", "gates"]
    assert list(dec["inputs"]) == ["embeddings", "box"] and list(dec["outputs"]) == ["masks", "iou_pred"]
    assert dec["outputs"]["masks"]["shape"] == ["B", 3, 256, 256]
    # the export's own check (fresh random inputs, onnxruntime vs torch) is stored
    assert on_disk["check"]["embeddings_rel_error"] < 1e-5
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / ENCODER_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "modal", "organ"]
    assert session.get_inputs()[0].shape[0] == session.get_inputs()[2].shape[0]  # the dynamic batch axis
    assert not isinstance(session.get_inputs()[0].shape[0], int)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_onnxruntime_gives_the_torch_models_outputs_at_any_batch(exported, batch):
    model, out, _ = exported
    onnx_model = OnnxModel.load(out, model_type="vit_tiny", threads=1)
    x = _example_inputs(model, batch=batch, seed=10 + batch)
    with torch.no_grad():
        ref = model(x["image"], x["box"], x["modal"], x["organ"])
        ref_embeddings, ref_gates = model.image_encoder(model.preprocess(x["image"]), x["modal"], x["organ"])
    got = onnx_model(x["image"], x["box"], x["modal"], x["organ"])
    embeddings, gates = onnx_model.encode(x["image"], x["modal"], x["organ"])
    assert got.masks.shape == ref.masks.shape == (batch, 3, 256, 256)
    assert float((embeddings - ref_embeddings).norm() / ref_embeddings.norm()) < 1e-5
    torch.testing.assert_close(gates, ref_gates, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.iou_pred, ref.iou_pred, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.masks, ref.masks, atol=1e-4, rtol=1e-4)
    _masks_agree(got.masks, ref.masks)


def test_the_context_rows_reach_the_gates(exported):
    model, out, _ = exported
    onnx_model = OnnxModel.load(out, threads=1)
    x = _example_inputs(model, batch=2, seed=7)
    image = x["image"][:1].repeat(2, 1, 1, 1)
    organ = x["organ"][:1].repeat(2, 1)
    organ[1] = torch.tensor([-1, -1, -1, 5])  # neutral levels, another task
    _, gates = onnx_model.encode(image, torch.tensor([1, 4]), organ)
    with torch.no_grad():
        _, ref = model.image_encoder(model.preprocess(image), torch.tensor([1, 4]), organ)
    torch.testing.assert_close(gates, ref, atol=1e-5, rtol=1e-4)
    assert (gates[:, 0] - gates[:, 1]).abs().max() > 1e-3  # same image, other context: other gates


def test_the_prediction_pipeline_gives_the_same_label_maps_on_both_backends(exported):
    model, out, _ = exported
    volume = np.full((5, 40, 48), -200, dtype=np.int16)
    volume[1:4, 8:30, 10:40] = 60
    prompt = np.zeros(volume.shape, dtype=np.uint8)
    prompt[1:4, 10:28, 12:38] = 5
    prompt[2, 30:36, 2:9] = 1
    common = dict(modality="CT", prompt_mask=prompt, labels_map="5:Liver,1:Spleen")
    torch_seg = Segmenter(model, "cpu", batch_size=2)
    onnx_seg = Segmenter.load("vit_tiny", backend="onnx", onnx_dir=out, device="cpu", batch_size=2, threads=1)
    assert onnx_seg.runner.backend == "onnx" and not onnx_seg.runner.prefix_cache
    a = torch_seg.segment(volume, **common)
    b = onnx_seg.segment(volume, **common)
    assert a.shape == b.shape == volume.shape and a.any()
    assert (a != b).sum() <= 2, f"{(a != b).sum()} voxels differ"  # at most rounding at the 0.5 threshold
    # the same runner, one batch: chosen outputs agree where the IoU predictions are not tied
    images = [np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [np.array([20, 30, 200, 180]), np.array([0, 0, 255, 255]), np.array([90, 90, 120, 140])]
    context = dict(modal=[2, 2, 5], organ=[[1, 4, 17, 59], [1, 4, 20, 64], [0, -1, -1, 3]])
    ref = torch_seg.runner.forward(images, boxes, **context)
    got = onnx_seg.runner.forward(images, boxes, **context)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-4)
    assert np.array_equal(got[1], ref[1])
    assert (got[0] != ref[0]).mean() < 1e-4


def test_normalisation_in_the_json_is_the_models_preprocess():
    image = torch.rand(2, 3, 256, 256) * 255
    image[1] /= 255  # a 0..1 image: lite leaves it as it is
    sam = build_model("vit_tiny")
    from medsegx.model.onnx_export import normalisation

    got = normalise(image.numpy(), json.loads(json.dumps(normalisation(sam))))
    assert np.array_equal(got, sam.preprocess(image).numpy())
    from medsegx.model.lite import LiteMedSegX

    lite_spec = {"kind": "divide_if_max_above_1", "divisor": 255.0}
    assert np.array_equal(normalise(image.numpy(), lite_spec), LiteMedSegX.preprocess(image).numpy())


# --------------------------------------------------------------------------- bad input: one-line errors


def test_bad_export_folders_are_one_line_errors(exported, tmp_path):
    _, out, _ = exported
    with pytest.raises(OnnxModelError, match=r"--onnx_dir .*missing: no such folder"):
        read_meta(tmp_path / "missing")
    with pytest.raises(OnnxModelError, match=r"exported from model_type 'vit_tiny', not 'lite' \(--model_type\)"):
        OnnxModel.load(out, model_type="lite")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxModelError, match=f"no {META_FILE}"):
        read_meta(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / DECODER_FILE).unlink()
    with pytest.raises(OnnxModelError, match=f"the decoder file '{DECODER_FILE}' .* is missing"):
        read_meta(broken)
    (broken / META_FILE).write_text("{not json")
    with pytest.raises(OnnxModelError, match="not readable JSON"):
        read_meta(broken)
    meta = json.loads((out / META_FILE).read_text())
    (broken / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(OnnxModelError, match="format version 99"):
        read_meta(broken)
    shutil.copy(out / DECODER_FILE, broken / DECODER_FILE)
    (broken / META_FILE).write_text(json.dumps(meta))
    (broken / ENCODER_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(OnnxModelError, match="onnxruntime cannot load it"):
        OnnxModel.load(broken)


def _cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code)
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line and not line.startswith("[medsegx] --device_ids")]
    return code, err


def test_the_commands_refuse_bad_onnx_arguments_in_one_line(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDSEGX_MALLOC_TUNING", "0")
    _, out, _ = exported
    ct = str(shared_path("data", "volumes", "ct_abdomen_small.nii.gz"))
    base = ["predict", "-i", ct, "-o", str(tmp_path / "pred"), "--modality", "CT", "--box", "1", "1", "1", "9", "9", "2",
            "--no_progress"]
    code, err = _cli([*base, "--model_type", "lite", "--backend", "onnx", "--onnx_dir", str(out)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "exported from model_type 'vit_tiny', not 'lite'" in err[0]
    code, err = _cli([*base, "--model_type", "vit_tiny", "--backend", "onnx", "--onnx_dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and err == [f"error: --onnx_dir {tmp_path / 'nope'}: no such folder (write one with 'medsegx "
                                 f"export --format onnx -o {tmp_path / 'nope'}')"]
    code, err = _cli([*base, "--model_type", "vit_tiny", "--backend", "onnx"], capsys)
    assert code == 2 and "needs --onnx_dir" in err[-1]
    code, err = _cli([*base, "--backend", "onnx", "--onnx_dir", str(out), "--model_weight", "w.pth"], capsys)
    assert code == 2 and "--model_weight: not used with --backend onnx" in err[-1]
    code, err = _cli(["export", "--model_type", "vit_tiny", "--format", "onnx", "-o", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "holds an export already" in err[0] and "--overwrite" in err[0]


def test_without_the_extra_the_error_names_it(exported, monkeypatch):
    _, out, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(OnnxUnavailableError) as err:
        OnnxModel.load(out)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert "pip install 'medsegx[onnx]'" in str(err.value)


def test_predict_runs_the_onnx_backend_end_to_end(exported, tmp_path, capsys, monkeypatch):
    """The command with --backend onnx writes what the torch backend writes (the tiny model is rebuilt
    from seed 0 by both commands: random weights, the same in both)."""
    monkeypatch.setenv("MEDSEGX_MALLOC_TUNING", "0")
    export_dir = tmp_path / "export"
    code, err = _cli(["export", "--model_type", "vit_tiny", "--format", "onnx", "-o", str(export_dir), "--no_check"],
                     capsys)
    assert code == 0, err
    ct = str(shared_path("data", "volumes", "ct_abdomen_small.nii.gz"))
    label = str(shared_path("data", "volumes", "ct_abdomen_small_label.nii.gz"))
    outputs = {}
    for backend in ("torch", "onnx"):
        extra = ["--onnx_dir", str(export_dir)] if backend == "onnx" else []
        code, err = _cli(["predict", "--model_type", "vit_tiny", "-i", ct, "-o", str(tmp_path / backend), "--modality",
                          "CT", "--prompt_mask", label, "--labels_map", "1:Spleen", "--no_progress", "--backend",
                          backend, *extra], capsys)
        assert code == 0, err
        import SimpleITK as sitk

        outputs[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / backend / "ct_abdomen_small.nii.gz")))
        log = json.loads((tmp_path / backend / "ct_abdomen_small.json").read_text())
        assert log["run"]["backend"] == backend
    assert outputs["torch"].any() and (outputs["torch"] != outputs["onnx"]).sum() <= 2


@pytest.mark.parametrize("part", ["decoder_adapters", "task_decoder"])
def test_context_decoders_export_with_the_context_as_a_decoder_input(tmp_path, part):
    """A model with context-gated decoder adapters or a task decoder: the decoder graph takes ``organ`` too,
    and per box it decodes as torch does (a trained task row / a trained task)."""
    torch.manual_seed(3)
    model = build_model("vit_tiny", **{part: True}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name or name.startswith(("image_encoder.modal_embed", "image_encoder.organ_embed",
                                                      "task_decoder.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    if part == "task_decoder":
        example = _example_inputs(model, batch=3, seed=21)
        model.task_decoder.mark_trained(example["organ"][:2, 3])  # a mixed batch: two trained, one not
    meta = export_onnx(model, tmp_path / "dec", source={"model_type": "vit_tiny"})
    assert "organ" in meta["decoder"]["inputs"] and meta["check"]["masks_equal"]
    onnx_model = OnnxModel.load(tmp_path / "dec", threads=1)
    x = _example_inputs(model, batch=3, seed=21)
    with torch.no_grad():
        ref = model(x["image"], x["box"], x["modal"], x["organ"])
    got = onnx_model(x["image"], x["box"], x["modal"], x["organ"])
    torch.testing.assert_close(got.masks, ref.masks, atol=1e-4, rtol=1e-4)
    _masks_agree(got.masks, ref.masks)
