"""The notebook API: ``Segmenter.load(...)``, then ``segment`` (numpy) or ``segment_file`` (a scan on disk).

    from medsegx import Segmenter
    seg = Segmenter.load("lite")                     # or Segmenter.load("vit_b", checkpoint=..., weights=...)
    mask = seg.segment(image, box=(x0, y0, x1, y1), modality="CT", task="Liver")
    seg.segment_file("ct.nii.gz", box=(x0, y0, z0, x1, y1, z1), out="ct_liver.nii.gz", modality="CT", task="Liver")

The one prediction pipeline: ``predict.py`` runs each planned case through :meth:`Segmenter.predict_job`
and ``medsegx serve`` each request through :meth:`Segmenter.predict`, the same call as ``segment`` and
``segment_file`` (:func:`~medsegx.inference.case.predict_case`): the preprocessing of ``prepare_data.py``,
the label-free output selection, the write-back.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..args import PROPAGATE_GROW
from ..data.convert import parse_labels_map
from ..data.presets import AXIAL, DEFAULT_AXIS, DEFAULT_ORIENT, DEFAULT_PERCENTILES, KEEP_ORDER, parse_window
from ..data.sources import read_label
from ..metrics.reference import ScoredObject, describe_scores, score_reference
from .case import (
    PIXEL_ONLY_EXTENSIONS,
    CaseJob,
    CasePrediction,
    PredictOptions,
    check_prompts,
    predict_case,
    read_case_image,
    write_image_atomic,
    write_json_atomic,
    write_overlay,
)
from .prompts import ObjectPrompt, PromptError, case_name, check_label, parse_box
from .runner import SliceRunner

if TYPE_CHECKING:
    from ..data.volume import SliceStack
    from ..model.onnx_runtime import OnnxModel

logger = logging.getLogger(__name__)


class Segmenter:
    """A model ready to segment images with box prompts (see the module docstring)."""

    def __init__(self, model: nn.Module | OnnxModel, device: torch.device | str = "cpu", *, batch_size: int = 8,
                 use_amp: bool = False, amp_dtype: str | None = None, select: str | None = None,
                 progress: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.runner = SliceRunner(self.model, self.device, batch_size=batch_size, amp=use_amp,
                                  amp_dtype=amp_dtype, select=select)
        self.progress = progress

    @classmethod
    def from_runner(cls, runner: SliceRunner, *, progress: bool = False) -> Segmenter:
        """A Segmenter over an existing runner (``medsegx serve``'s, over its cached model)."""
        segmenter = cls.__new__(cls)
        segmenter.runner, segmenter.model, segmenter.device = runner, runner.model, runner.device
        segmenter.progress = progress
        return segmenter

    @classmethod
    def load(cls, model_type: str = "lite", *, checkpoint: str | Path | None = None,
             weights: str | Path | None = None, device: str | torch.device | None = None, fast: bool = True,
             backend: str = "torch", onnx_dir: str | Path | None = None, threads: int | None = None,
             **kwargs) -> Segmenter:
        """Build ``model_type`` (``lite``, ``vit_b``, ...) with its base weights (``checkpoint``: the
        folder or file of Meta's SAM weights; not needed for ``lite``) and MedSegX ``weights``.

        ``backend="onnx"``: run the files of ``medsegx export --format onnx -o onnx_dir`` with
        onnxruntime instead (the weights are in them; ``model_type`` must be the exported one;
        ``threads``: onnxruntime's, default torch's). ``device`` defaults to the first GPU if there
        is one; other keyword arguments go to :class:`Segmenter` (``batch_size``, ``use_amp``,
        ``select``, ``progress``).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if backend == "onnx":
            from ..model.onnx_runtime import OnnxModel, OnnxModelError

            if onnx_dir is None:
                raise OnnxModelError("backend='onnx' needs onnx_dir (a folder written by 'medsegx export --format onnx')")
            if checkpoint is not None or weights is not None:
                raise OnnxModelError("backend='onnx': the weights are in the ONNX files; export them with "
                                     "'medsegx export --checkpoint ... --model_weight ...' instead")
            return cls(OnnxModel.load(onnx_dir, model_type=model_type, threads=threads, device=device), device,
                       **kwargs)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        from ..model import build_model

        model = build_model(model_type, checkpoint=checkpoint, model_weight=weights, fast=fast)
        return cls(model, device, **kwargs)

    # ------------------------------------------------------------------ numpy in, numpy out
    def segment(self, image: np.ndarray, box: Sequence[int] | None = None, *, modality: str,
                task: str | None = None, prompt_mask: np.ndarray | None = None,
                labels_map: str | Mapping | None = None, label: int = 1, propagate: bool = False,
                propagate_grow: int = PROPAGATE_GROW, seed: int | None = None, box_margin: int = 0,
                window: str | tuple[float, float] | None = None,
                percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
        """Segment a numpy image; returns a uint8 label map of the image's spatial shape.

        Args:
            image: (H, W) or (H, W, 3) 2-D, or (Z, Y, X) volume (numpy order, as
                ``sitk.GetArrayFromImage`` returns it); taken in its stored order (no re-orientation).
            box: (x0, y0, x1, y1) or (x0, y0, z0, x1, y1, z1), inclusive indices (x = column).
            prompt_mask: instead of a box, an integer mask of the image's spatial shape: one object per
                value (or per entry of ``labels_map``: ``"5:Liver,1:Spleen"`` or ``{5: "Liver"}``), boxes
                from it per slice.
            label: the value written for ``box``'s object.
            propagate, propagate_grow, seed: with a volume box, follow the object from slice to slice
                (see :class:`~medsegx.inference.prompts.ObjectPrompt` for ``seed``).
            window, percentiles: intensity mapping as ``prepare_data.py`` (default: by modality and task).
        """
        array = np.asarray(image)
        colour = array.ndim == 3 and array.shape[-1] == 3
        if array.ndim not in (2, 3):
            raise ValueError(f"image must be (H, W), (H, W, 3) or (Z, Y, X), got shape {array.shape}")
        sitk_image = sitk.GetImageFromArray(array, isVector=colour)
        mask = None
        if prompt_mask is not None:
            mask = np.asarray(prompt_mask)
            spatial = array.shape[:2] if colour else array.shape
            if mask.shape != spatial or not np.issubdtype(mask.dtype, np.integer) or mask.min(initial=0) < 0:
                raise PromptError(f"prompt_mask must be a non-negative integer array of shape {spatial}, "
                                  f"got {mask.dtype} {mask.shape}")
        opts = _options(modality=modality, task=task, window=window, percentiles=percentiles, axis=AXIAL,
                        orient=KEEP_ORDER, propagate=propagate, propagate_grow=propagate_grow, box_margin=box_margin,
                        labels_map=labels_map)
        return self._predict("image", sitk_image, Path("image"), opts, box, mask, label, seed).array

    # ------------------------------------------------------------------ a file in, a file out
    def segment_file(self, path: str | Path, box: Sequence[int] | None = None, *, modality: str,
                     task: str | None = None, out: str | Path | None = None,
                     prompt_mask: str | Path | None = None, labels_map: str | Mapping | None = None,
                     label: int = 1, propagate: bool = False, propagate_grow: int = PROPAGATE_GROW,
                     seed: int | None = None, box_margin: int = 0,
                     window: str | tuple[float, float] | None = None,
                     percentiles: tuple[float, float] = DEFAULT_PERCENTILES, axis: str = DEFAULT_AXIS,
                     orient: str = DEFAULT_ORIENT, log: str | Path | None = None,
                     overlay: str | Path | None = None, reference: str | Path | None = None,
                     nsd_tolerance: float = 2.0) -> CasePrediction:
        """Segment a scan file (volume, DICOM folder, 2-D image, .npy slice) as ``predict.py`` does.

        The box is in the file's stored voxel indices. Writes the label map to ``out`` (the input's
        geometry), the per-slice record to ``log`` and an overlay PNG to ``overlay`` when given; with
        ``reference`` (a label file of the scan) the record holds the objects' DSC, HD95 and NSD.
        Returns the :class:`~medsegx.inference.case.CasePrediction` (``.array``, ``.image``, ``.log()``).
        """
        path = Path(path)
        prompts = _box_prompts(box, prompt_mask, label, seed)
        opts = _options(modality=modality, task=task, window=window, percentiles=percentiles, axis=axis,
                        orient=orient, propagate=propagate, propagate_grow=propagate_grow, box_margin=box_margin,
                        labels_map=labels_map)
        image = read_case_image(path)
        out, prompt_mask, reference, log, overlay = (None if f is None else Path(f)
                                                     for f in (out, prompt_mask, reference, log, overlay))
        job = CaseJob(case_name(path), path, out, prompts, prompt_mask, reference, log, overlay)
        check_prompts(prompts, image.GetSize(), opts.propagate, f"case {job.case!r}")
        return self.predict_job(job, opts, image=image, nsd_tolerance=nsd_tolerance)

    # ------------------------------------------------------------------ the pipeline's one-case entries
    def predict(self, case: str, image: sitk.Image, source: str | Path, prompts: Sequence[ObjectPrompt] | None,
                opts: PredictOptions, prompt_mask: np.ndarray | None = None, *, stack: SliceStack | None = None,
                intensity_cache: dict | None = None) -> CasePrediction:
        """One image whose prompts the caller has checked (:func:`~medsegx.inference.case.check_prompts`); see
        :func:`~medsegx.inference.case.predict_case` for ``stack`` and ``intensity_cache``."""
        return predict_case(self.runner, case, image, source, prompts, opts, prompt_mask, progress=self.progress,
                            stack=stack, intensity_cache=intensity_cache)

    def predict_job(self, job: CaseJob, opts: PredictOptions, *, run_info: Mapping | None = None,
                    nsd_tolerance: float = 2.0, image: sitk.Image | None = None) -> CasePrediction:
        """One planned case: read the image (unless given) and the prompt mask, predict, write the label map,
        score against the reference, write the JSON record and the overlay (the files ``job`` names).

        ``run_info``: the run's settings (``predict.py``); the record then also names the output, the run
        and the prompt mask.
        """
        if image is None:
            image = read_case_image(job.image)
        mask = read_label(job.prompt_mask, image, job.image) if job.prompt_mask is not None else None
        prediction = self.predict(job.case, image, job.image, job.objects, opts, mask)
        record = {"input": str(job.image)}
        if run_info is not None:
            record.update(output=str(job.output), **prediction.log(), run=dict(run_info))
            if job.prompt_mask is not None:
                record["prompt_mask"] = str(job.prompt_mask)
        else:
            record.update(prediction.log())
        if job.output is not None:
            write_image_atomic(prediction.image, job.output)
        if job.reference is not None:
            scores = self.score(prediction, read_label(job.reference, image, job.image), job.image, nsd_tolerance)
            record["reference"] = {"file": str(job.reference), "scores": scores}
            for line in describe_scores(job.case, scores):
                logger.info("%s", line)
        if job.log is not None:
            write_json_atomic(record, job.log)
        if job.overlay is not None:
            write_overlay(prediction, job.overlay)
        return prediction

    @staticmethod
    def score(prediction: CasePrediction, reference: np.ndarray, source: str | Path,
              nsd_tolerance: float = 2.0) -> list[dict]:
        """:func:`~medsegx.metrics.reference.score_reference` of ``prediction``; distances in mm unless the
        input ``source`` is a format without a physical pixel size (then pixels)."""
        physical = not Path(source).name.lower().endswith(PIXEL_ONLY_EXTENSIONS)
        spacing = list(reversed(prediction.image.GetSpacing())) if physical else None
        objects = [ScoredObject(o.label, o.context.task, o.prompt.reference_values) for o in prediction.objects]
        return score_reference(prediction.array, reference, objects, spacing, nsd_tolerance)

    def _predict(self, case: str, image: sitk.Image, source: Path, opts: PredictOptions, box, mask, label: int,
                 seed: int | None) -> CasePrediction:
        prompts = _box_prompts(box, mask, label, seed)
        check_prompts(prompts, image.GetSize(), opts.propagate, f"case {case!r}")
        return self.predict(case, image, source, prompts, opts, mask)


def _box_prompts(box, mask, label: int, seed: int | None) -> list[ObjectPrompt] | None:
    """The one object of ``box`` (None with a prompt mask); exactly one of the two."""
    if (box is None) == (mask is None):
        raise PromptError("give exactly one prompt: box=... or prompt_mask=...")
    if box is None:
        return None
    return [ObjectPrompt(label=check_label(label, "label"), box=parse_box(list(box), "box"), seed=seed)]


def _options(*, window, percentiles, labels_map, propagate_grow, box_margin, **fields) -> PredictOptions:
    """The PredictOptions of an API call, its text forms (``"-160,240"``, ``"5:Liver"``) parsed as the command's."""
    if isinstance(labels_map, (str, Mapping)):
        labels_map = parse_labels_map(labels_map)
    if isinstance(window, str):
        window = parse_window(window)
    return PredictOptions(window=window, percentiles=tuple(percentiles), labels_map=labels_map,
                          propagate_grow=int(propagate_grow), box_margin=int(box_margin), **fields)
