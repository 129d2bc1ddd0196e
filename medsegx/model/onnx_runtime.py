"""The onnxruntime backend: the files of ``medsegx export --format onnx`` with the torch models' call interface.

:class:`OnnxModel` reads an export folder (``medsegx_onnx.json`` and the two graphs, see
:mod:`medsegx.model.onnx_export`), checks it, and is called like a MedSegX model
(``model(image 0..255, box, modal, organ) -> MedSegXOutput``), so
:class:`~medsegx.inference.runner.SliceRunner` runs it through the same prediction pipeline:
only the forward differs (same preprocessing of the scan, same output selection, same write-back).
The image normalisation is the JSON's (:func:`normalise`).

Not available on this backend: the lite prefix cache (one graph per encoder; each (slice, object)
runs the whole encoder), ``--use_amp`` (the graphs are float32).
"""
from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .config import MODEL_TYPES, ModelConfig
from .medsegx import MedSegXOutput

logger = logging.getLogger(__name__)

FORMAT = "medsegx-onnx"
FORMAT_VERSION = 1
META_FILE = "medsegx_onnx.json"
ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "prompt_decoder.onnx"


class OnnxUnavailableError(UserError, ImportError):
    """onnx / onnxruntime / onnxscript is not installed."""


def require(module: str, purpose: str) -> Any:
    """``import module`` or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailableError(f"{purpose} needs the Python package {module!r}: pip install 'medsegx[onnx]' "
                                   "(onnx, onnxruntime, onnxscript)") from None


def normalise(image: np.ndarray, spec: Mapping) -> np.ndarray:
    """The encoder input of ``image`` (``B x 3 x H x W`` float32, 0..255) by the JSON's ``normalisation``;
    the same float32 operations as the torch models' ``preprocess``."""
    image = np.asarray(image, dtype=np.float32)
    if spec["kind"] == "mean_std":
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return (image - mean) / std
    if spec["kind"] == "divide_if_max_above_1":
        scale = image.reshape(image.shape[0], -1).max(axis=1) > 1
        return np.where(scale[:, None, None, None], image / np.float32(spec["divisor"]), image)
    raise ValueError(f"unknown normalisation {spec['kind']!r}")


class OnnxModelError(UserError, ValueError):
    """An export folder that is missing, incomplete, of another format or of another model type."""


def read_meta(onnx_dir: str | Path, model_type: str | None = None) -> dict:
    """The checked JSON of an export folder; ``model_type`` (when given) must be the one it was exported from."""
    folder = Path(onnx_dir)
    if not folder.is_dir():
        raise OnnxModelError(f"--onnx_dir {folder}: no such folder (write one with 'medsegx export --format onnx -o "
                             f"{folder}')")
    path = folder / META_FILE
    if not path.is_file():
        raise OnnxModelError(f"{folder}: no {META_FILE}; not a folder written by 'medsegx export --format onnx'")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxModelError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OnnxModelError(f"{path}: not a MedSegX ONNX description (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise OnnxModelError(f"{path}: format version {meta.get('format_version')!r}, this MedSegX reads "
                             f"{FORMAT_VERSION}: export the model again")
    exported = meta.get("model_type")
    if exported not in MODEL_TYPES:
        raise OnnxModelError(f"{path}: unknown model_type {exported!r}")
    if model_type is not None and exported != model_type:
        raise OnnxModelError(f"{path}: exported from model_type {exported!r}, not {model_type!r} (--model_type)")
    for key in ("encoder", "decoder"):
        name = meta.get("files", {}).get(key)
        if not name or not (folder / name).is_file():
            raise OnnxModelError(f"{folder}: the {key} file {name or (ENCODER_FILE if key == 'encoder' else DECODER_FILE)!r} "
                                 f"named by {META_FILE} is missing")
    return meta


def _session(ort: Any, graph: str | bytes, threads: int | None, device: torch.device):
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(graph, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for a damaged file
        where = graph if isinstance(graph, str) else "the exported graph"
        raise OnnxModelError(f"{where}: onnxruntime cannot load it ({str(err).splitlines()[0][:200]})") from None


class OnnxModel:
    """The exported encoder and decoder run by onnxruntime, called like a MedSegX model (module docstring)."""

    backend = "onnx"
    supports_prefix_cache = False

    def __init__(self, encoder: str | bytes, decoder: str | bytes, meta: Mapping, *, threads: int | None = None,
                 device: str | torch.device = "cpu", name: str = "<export>") -> None:
        ort = require("onnxruntime", "the onnx backend (--backend onnx)")
        self.meta = dict(meta)
        self.name = name
        self.device = torch.device(device)
        self.config = ModelConfig.from_dict(self.meta["config"])
        self._encoder = _session(ort, encoder, threads, self.device)
        self._decoder = _session(ort, decoder, threads, self.device)
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self._encoder.get_providers():
            logger.warning("--backend onnx: onnxruntime has no CUDA provider here (install onnxruntime-gpu); "
                           "the graphs run on the CPU")

    @classmethod
    def load(cls, onnx_dir: str | Path, *, model_type: str | None = None, threads: int | None = None,
             device: str | torch.device = "cpu") -> OnnxModel:
        """An export folder (checked by :func:`read_meta`)."""
        require("onnxruntime", "the onnx backend (--backend onnx)")
        folder = Path(onnx_dir)
        meta = read_meta(folder, model_type)
        return cls(str(folder / meta["files"]["encoder"]), str(folder / meta["files"]["decoder"]), meta,
                   threads=threads, device=device, name=str(folder))

    @classmethod
    def from_bytes(cls, encoder: bytes, decoder: bytes, meta: Mapping, *, threads: int | None = None) -> OnnxModel:
        return cls(encoder, decoder, meta, threads=threads)

    # The nn.Module calls the pipeline makes on a model.
    def eval(self) -> OnnxModel:
        return self

    def to(self, device: str | torch.device) -> OnnxModel:
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({self.name}, model_type={self.config.model_type!r}, opset={self.meta.get('opset')})"

    # ------------------------------------------------------------------ forward
    def encode(self, image: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` ``B x 3 x 256 x 256`` in 0..255 -> (embeddings, gates), as the torch models' ``encode``."""
        size = self.meta["input_size"]
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise ValueError(f"image must be B x 3 x {size} x {size} (0..255), got {tuple(image.shape)}")
        feed = {"image": normalise(_numpy(image, np.float32), self.meta["normalisation"]),
                "modal": _numpy(modal, np.int64), "organ": _numpy(organ, np.int64)}
        embeddings, gates = self._encoder.run(["embeddings", "gates"], feed)
        return self._tensor(embeddings), self._tensor(gates)

    def decode(self, embeddings: torch.Tensor, box: torch.Tensor, organ: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One box per image: masks ``B x M x 256 x 256`` logits and ``iou_pred`` ``B x M``. ``organ``
        (``B x 4``): the context, read by the graph of a model with decoder adapters only."""
        if box.dim() != 2 or box.shape != (embeddings.shape[0], 4):
            raise ValueError(f"box must be B x 4 (one box per image), got {tuple(box.shape)}")
        feed = {"embeddings": _numpy(embeddings, np.float32), "box": _numpy(box, np.float32)}
        if "organ" in self.meta["decoder"]["inputs"]:
            if organ is None:
                raise ValueError("this model's decoder adapters need the slices' organ indices (B x 4)")
            feed["organ"] = _numpy(organ.expand(box.shape[0], -1) if organ.shape[0] == 1 else organ, np.int64)
        masks, iou = self._decoder.run(["masks", "iou_pred"], feed)
        return self._tensor(masks), self._tensor(iou)

    def __call__(self, image: torch.Tensor, box: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor,
                 **_: Any) -> MedSegXOutput:
        """``model(image, box, modal, organ)`` as the torch models (extra keywords such as ``cache_keys``
        are accepted and unused)."""
        embeddings, gates = self.encode(image, modal, organ)
        masks, iou = self.decode(embeddings, box, organ=organ)
        return MedSegXOutput(masks, iou, gates)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


def _numpy(t: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype=dtype)
