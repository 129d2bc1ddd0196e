"""ONNX export of a MedSegX model: the image encoder and the prompt encoder + mask decoder.

``medsegx export --model_type lite --format onnx -o DIR`` (:func:`export_onnx`) writes three files:

- ``image_encoder.onnx``: ``image`` ``B x 3 x 256 x 256`` float32, *normalised* (see the JSON),
  ``modal`` ``B`` int64, ``organ`` ``B x 4`` int64 [body part, subregion, organ, task] (``-1``: a
  level the task does not determine) -> ``embeddings`` ``B x C x h x w`` and ``gates``
  ``n_adapted x B x E``. The context rows are inputs because ConMoAE's expert gates depend on them.
- ``prompt_decoder.onnx``: ``embeddings`` and ``box`` ``B x 4`` float32 (x0, y0, x1, y1 on the
  256 grid), and ``organ`` as above for a model with decoder adapters or a task decoder -> ``masks`` ``B x M x 256 x 256`` logits and ``iou_pred`` ``B x M`` (M = 3 for
  ``mask_outputs="multimask"``, 1 for "single", as the config says).
- ``medsegx_onnx.json``: what the files expect (input size, normalisation, names, shapes and
  dtypes), the model config they came from, the weights, opset and the torch / onnx versions.

The batch axis is dynamic. The graphs are traced from the stock modules (``set_fast(False)``:
the reference the fast paths are tested against; the fast paths' work buffers and in-place ops
are not graph material) with ``torch.export`` (strict: TinyViT's ``len(x)`` would pin the batch
otherwise) and translated by ``torch.onnx.export(dynamo=True)``; the TorchScript exporter was
measured unfaithful here (ViT image embeddings off by 2.5e-3 relative). After writing, the files
are run once with onnxruntime against the torch model and the differences stored in the JSON.

onnx, onnxruntime and onnxscript are the optional extra ``onnx`` (``pip install 'medsegx[onnx]'``).
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .onnx_runtime import (  # noqa: F401  (the format's names, owned by the reader)
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    OnnxModel,
    OnnxUnavailableError,
    normalise,
    require,
)

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXPORT_BATCH = 2  # traced with two images (a batch of one could be taken for a constant)
MAX_BATCH = 4096


# --------------------------------------------------------------------------- what the graphs expect
def normalisation(model: nn.Module) -> dict:
    """How a ``B x 3 x 256 x 256`` image in 0..255 becomes the encoder's ``image`` input (as the torch model's
    ``preprocess`` does it), as plain data for the JSON."""
    if getattr(model.config, "model_type", None) == "lite":
        return {"kind": "divide_if_max_above_1", "divisor": 255.0,
                "text": "per image: x / 255 when max(x) > 1, else x (LiteMedSAM's input is 0..1)"}
    mean = [float(v) for v in model.pixel_mean.flatten()]
    std = [float(v) for v in model.pixel_std.flatten()]
    return {"kind": "mean_std", "mean": mean, "std": std,
            "text": "per channel: (x - mean) / std on 0..255 RGB (SAM's pixel mean and std)"}


class _EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor):
        return self.image_encoder(image, modal, organ)


class _DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, box: torch.Tensor, organ: torch.Tensor | None = None):
        return self.model.decode(embeddings, box, organ=organ)


def _decoder_reads_context(cfg) -> bool:
    return bool(cfg.decoder_adapters or cfg.task_decoder)


def _example_inputs(model: nn.Module, batch: int = EXPORT_BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 0..255 image batch, boxes and context rows (one neutral level) on the 256 grid."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    image = torch.rand(batch, 3, cfg.img_size, cfg.img_size, generator=g) * 255
    modal = torch.randint(0, cfg.num_modalities, (batch,), generator=g)
    organ = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cfg.level_sizes[1:]], dim=1)
    organ[0, 1] = -1  # NEUTRAL_ROW
    x0 = torch.randint(0, 96, (batch, 2), generator=g).float()
    box = torch.cat([x0, x0 + torch.randint(40, 150, (batch, 2), generator=g).float()], dim=1)
    return {"image": image, "modal": modal, "organ": organ, "box": box}


def _to_proto_bytes(graph: nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: dict,
                    opset: int) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = {name: {axis: batch} for name, axis in dynamic.items()}
    with torch.no_grad():
        program = torch.export.export(graph.eval(), args, dynamic_shapes=shapes, strict=True)
        onnx_program = torch.onnx.export(program, args, input_names=names, output_names=outputs,
                                         opset_version=opset, dynamo=True, optimize=True, verbose=False)
    buffer = io.BytesIO()
    onnx = require("onnx", "ONNX export")
    onnx.save_model(onnx_program.model_proto, buffer)
    return buffer.getvalue()


def _io_spec(model: nn.Module, embeddings: torch.Tensor, gates: torch.Tensor, masks: torch.Tensor) -> dict:
    c, h, w = embeddings.shape[1:]
    size = model.config.img_size
    return {
        "encoder": {
            "inputs": {"image": {"shape": ["B", 3, size, size], "dtype": "float32"},
                       "modal": {"shape": ["B"], "dtype": "int64"},
                       "organ": {"shape": ["B", 4], "dtype": "int64"}},
            "outputs": {"embeddings": {"shape": ["B", int(c), int(h), int(w)], "dtype": "float32"},
                        "gates": {"shape": [int(gates.shape[0]), "B", int(gates.shape[2])], "dtype": "float32"}},
        },
        "decoder": {
            "inputs": {"embeddings": {"shape": ["B", int(c), int(h), int(w)], "dtype": "float32"},
                       "box": {"shape": ["B", 4], "dtype": "float32"},
                       # the decoder adapters' gates and the task decoder read the task (model/decoder_adapters.py)
                       **({"organ": {"shape": ["B", 4], "dtype": "int64"}} if _decoder_reads_context(model.config) else {})},
            "outputs": {"masks": {"shape": ["B", int(masks.shape[1]), size, size], "dtype": "float32"},
                        "iou_pred": {"shape": ["B", int(masks.shape[1])], "dtype": "float32"}},
        },
    }


def export_onnx(model: nn.Module, out_dir: str | Path, *, source: Mapping[str, Any] | None = None,
                opset: int = DEFAULT_OPSET, check: bool = True) -> dict:
    """Write the two ONNX files and the JSON of ``model`` (a built MedSegX model) into ``out_dir``.

    ``source``: where the weights came from (model type, checkpoint, MedSegX weights), stored as is.
    All three files are written as a set (temporary names, then renamed). Returns the JSON's content.
    """
    from .. import runtime
    from ..fileio import atomic_write_set

    for module in ("onnx", "onnxscript"):
        require(module, "ONNX export")
    model = model.cpu().eval()
    cfg = model.config
    for name in ("onnx_ir", "onnxscript"):  # their optimiser passes log every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    example = _example_inputs(model)
    fast = bool(model.image_encoder.fast)
    model.image_encoder.set_fast(False)
    try:
        with torch.no_grad():
            image = model.preprocess(example["image"])
            embeddings, gates = model.image_encoder(image, example["modal"], example["organ"])
            masks, _ = model.decode(embeddings, example["box"], organ=example["organ"])
        encoder = _to_proto_bytes(_EncoderGraph(model), (image, example["modal"], example["organ"]),
                                  ["image", "modal", "organ"], ["embeddings", "gates"],
                                  {"image": 0, "modal": 0, "organ": 0}, opset)
        names = ["embeddings", "box"] + (["organ"] if _decoder_reads_context(cfg) else [])
        decoder = _to_proto_bytes(_DecoderGraph(model), tuple(example[n] if n != "embeddings" else embeddings
                                                              for n in names),
                                  names, ["masks", "iou_pred"], dict.fromkeys(names, 0), opset)
    finally:
        model.image_encoder.set_fast(fast)
    onnx = require("onnx", "ONNX export")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_type": cfg.model_type, "config": cfg.to_dict(), "source": dict(source or {}),
        "files": {"encoder": ENCODER_FILE, "decoder": DECODER_FILE},
        "input_size": cfg.img_size, "image_range": "0..255 RGB, B x 3 x H x W, resized to input_size",
        "normalisation": normalisation(model),
        "mask_outputs": cfg.mask_outputs, "threshold": "sigmoid(masks) > 0.5",
        **_io_spec(model, embeddings, gates, masks),
        "opset": opset, "exporter": "torch.export (strict) + torch.onnx.export(dynamo=True), stock modules",
        "torch": torch.__version__, "onnx": onnx.__version__, "git": runtime.git_revision(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if check:
        meta["check"] = check_export(model, encoder, decoder, meta)
        logger.info("onnxruntime vs torch on %d random images: embeddings %.1e relative, masks %s", EXPORT_BATCH,
                    meta["check"]["embeddings_rel_error"],
                    "equal" if meta["check"]["masks_equal"] else f"{meta['check']['mask_pixels_differ']} px differ")
    written = atomic_write_set({out / ENCODER_FILE: lambda f: f.write(encoder),
                                out / DECODER_FILE: lambda f: f.write(decoder),
                                out / META_FILE: json.dumps(meta, indent=2) + "\n"})
    umask = os.umask(0)
    os.umask(umask)
    for path in written:  # the permissions a new file gets (the temporaries are private)
        os.chmod(path, 0o666 & ~umask)
    return meta


def check_export(model: nn.Module, encoder: bytes, decoder: bytes, meta: Mapping) -> dict:
    """Run the exported graphs on fresh random inputs with onnxruntime against the torch model (its own
    path, fast by default): relative error of the embeddings, largest logit difference, masks equal."""
    example = _example_inputs(model, batch=EXPORT_BATCH, seed=1)
    runner = OnnxModel.from_bytes(encoder, decoder, meta, threads=torch.get_num_threads())
    with torch.no_grad():
        ref = model(example["image"], example["box"], example["modal"], example["organ"])
        embeddings, _ = model.image_encoder(model.preprocess(example["image"]), example["modal"], example["organ"])
        got = runner(example["image"], example["box"], example["modal"], example["organ"])
        onnx_embeddings = runner.encode(example["image"], example["modal"], example["organ"])[0]
    rel = float((onnx_embeddings - embeddings).norm() / embeddings.norm().clamp_min(1e-12))
    differ = int(((got.masks > 0) != (ref.masks > 0)).sum())
    return {"images": EXPORT_BATCH, "embeddings_rel_error": rel,
            "masks_max_abs_logit_diff": float((got.masks - ref.masks).abs().max()),
            "iou_max_abs_diff": float((got.iou_pred - ref.iou_pred).abs().max()),
            "masks_equal": differ == 0, "mask_pixels_differ": differ}
