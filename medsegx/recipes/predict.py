"""Prediction (predict.py, ``medsegx predict``): a user's own scans in, masks in their geometry out.

This module parses and plans (every check before any work); each planned case then runs through
:meth:`medsegx.inference.segmenter.Segmenter.predict_job`, the pipeline of the Python API and of
``medsegx serve``. The flags and their description are in :func:`medsegx.args.predict_parser`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import SimpleITK as sitk

from .. import runtime
from ..data.convert import parse_labels_map
from ..data.errors import ConversionError
from ..data.presets import parse_window
from ..data.sources import (
    check_image_dimensions,
    check_label_geometry,
    find_images,
    find_label,
    read_label,
)
from ..data.taxonomy import load_taxonomy
from ..errors import UserError
from ..fileio import NotWritableError, ensure_writable_dir
from ..inference.case import (
    CASE_EXTENSIONS,
    CaseJob,
    PredictOptions,
    check_prompts,
    output_suffix,
    read_case_image,
)
from ..inference.prompts import (
    NPY_EXTENSION,
    ObjectPrompt,
    case_name,
    check_label,
    load_prompts_file,
    parse_box,
)

logger = logging.getLogger(__name__)


class PredictError(UserError, ValueError):
    """A problem with the command's input found before any work: one line naming what is wrong."""


# --------------------------------------------------------------------------- planning (before any work)


def list_inputs(spec: str) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]]]:
    """Cases of ``-i`` as (name, path), and the entries of an input folder that are not images."""
    if any(ch in spec for ch in "*?["):
        try:
            paths = find_images(spec)
        except FileNotFoundError as err:
            raise PredictError(str(err)) from None
        return [(case_name(p), p) for p in paths], []
    root = Path(spec)
    if not root.exists():
        raise PredictError(f"{root}: no such file or folder")
    if root.is_file():
        if not root.name.lower().endswith(CASE_EXTENSIONS):
            raise PredictError(f"{root}: not an image file (supported: {' '.join(CASE_EXTENSIONS)})")
        return [(case_name(root), root)], []
    try:
        found = find_images(root)
    except FileNotFoundError:
        found = []
    if found == [root]:
        return [(case_name(root), root)], []  # the folder is one DICOM series
    found += [p for p in sorted(root.iterdir()) if p.is_file() and p.name.lower().endswith(NPY_EXTENSION)]
    ignored = []
    for entry in sorted(root.iterdir()):
        if entry in found or entry.name.startswith("."):
            continue
        why = "a folder without a DICOM series" if entry.is_dir() else \
            f"not an image file (supported: {' '.join(CASE_EXTENSIONS)})"
        ignored.append((entry, why))
    if not found:
        raise PredictError(f"{root}: no image or DICOM series found")
    return [(case_name(p), p) for p in sorted(found)], ignored


def _read_header(path: Path) -> sitk.Image | sitk.ImageFileReader:
    """What the checks need (dimension, size, geometry) without reading the pixels of a file."""
    if path.is_dir() or path.name.lower().endswith(NPY_EXTENSION):
        return read_case_image(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        raise ConversionError(f"{path}: cannot read image ({lines[-1] if lines else err})") from None
    return reader


def _matching(spec: str | None, flag: str, name: str, image: Path, n_cases: int) -> Path | None:
    """The file of ``flag`` (a file for one case, or a folder matched by case name) for a case."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        if n_cases > 1:
            raise PredictError(f"{flag} {path} is one file but the input holds {n_cases} cases: "
                               "give a folder whose files are named like the cases")
        return path
    if path.is_dir():
        try:
            return find_label(image, path)
        except ConversionError:
            return None
    raise PredictError(f"{flag} {path}: no such file or folder")


def _check_output_folder(out: Path, inputs: list[Path], folder_input: bool) -> None:
    """The output folder exists (or is created) and is writable; it is never an input folder."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if folder_input:  # a folder of cases (or one DICOM series): nothing is written in or below it
            inside = target == source or source in target.parents
        else:
            inside = target == source.parent or target == source
        if inside:
            raise PredictError(f"-o {out}: inside the input {source}; predictions are never written into input folders")
    try:
        ensure_writable_dir(out)
    except NotWritableError as err:
        raise PredictError(f"-o {out}: output folder is not writable ({err.reason})") from None


def plan(args: argparse.Namespace) -> tuple[list[CaseJob], list[str]]:
    """Every check that can fail before the model is built; returns the jobs and report lines."""
    load_taxonomy().canonical_modality(args.modality)  # an unknown modality: an error listing the known ones
    _window(args.window)
    out = Path(args.output)
    if args.seed_slice is not None and (args.box is None or not args.propagate):
        raise PredictError("--seed_slice is where --propagate starts from --box; it needs --box and --propagate")
    if args.labels_map is not None and args.prompt_mask is None:
        raise PredictError("--labels_map selects values of --prompt_mask; it needs --prompt_mask")
    labels_map = None
    if args.labels_map is not None:
        try:
            labels_map = parse_labels_map(args.labels_map)
        except ValueError as err:
            raise PredictError(f"--labels_map: {err}") from None
    box = parse_box(args.box, "--box") if args.box is not None else None
    check_label(args.label, "--label")
    if args.label != 1 and box is None:
        raise PredictError("--label is the value of --box's object (--prompts give 'label' per object; "
                           "--prompt_mask keeps its own values)")
    by_case = load_prompts_file(args.prompts) if args.prompts else None
    cases, ignored = list_inputs(args.input)
    report = [f"skip {path}: {why}" for path, why in ignored]

    names = {}
    for name, path in cases:
        if name in names:
            raise PredictError(f"inputs {names[name]} and {path} are both case {name!r}; their outputs would collide")
        names[name] = path
    masks = {name: _matching(args.prompt_mask, "--prompt_mask", name, path, len(cases)) for name, path in cases}
    references = {name: _matching(args.reference, "--reference", name, path, len(cases)) for name, path in cases}
    # masks and references may sit among the images (case.nii.gz + case_seg.nii.gz): they are not cases
    used = {p.resolve() for p in (*masks.values(), *references.values()) if p is not None}
    cases = [(name, path) for name, path in cases if path.resolve() not in used]
    if by_case is not None:
        missing = sorted(set(by_case) - {name for name, _ in cases})
        if missing:
            raise PredictError(f"{args.prompts} names case(s) not in the input: {', '.join(missing)} "
                               f"(input cases: {', '.join(name for name, _ in cases)})")
    globbed = any(ch in args.input for ch in "*?[")
    _check_output_folder(out, [p for _, p in cases] if globbed else [Path(args.input)],
                         folder_input=not globbed and Path(args.input).is_dir())

    jobs = []
    for name, path in cases:
        try:
            header = _read_header(path)
            check_image_dimensions(header, path)
        except ConversionError as err:
            if len(cases) == 1:
                raise
            report.append(f"skip {path}: {err}")
            continue
        output = out / (name + output_suffix("image2d" if header.GetDimension() == 2 else "volume"))
        if output.exists() and not args.overwrite:
            report.append(f"keep {output} (exists; --overwrite replaces it)")
            continue
        if by_case is not None and name not in by_case:
            report.append(f"skip {path}: no prompt for case {name!r} in {args.prompts}")
            continue
        if args.prompt_mask is not None and masks[name] is None:
            report.append(f"skip {path}: no prompt mask named like case {name!r} in {args.prompt_mask}")
            continue
        job = CaseJob(name, path, output, prompt_mask=masks[name], reference=references[name],
                      log=out / f"{name}.json", overlay=out / f"{name}_overlay.png" if args.overlay else None)
        if box is not None:
            job.objects = [ObjectPrompt(label=args.label, box=box, seed=args.seed_slice)]
        elif by_case is not None:
            job.objects = by_case[name]
        check_prompts(job.objects, header.GetSize(), args.propagate, f"case {name!r} ({path})")
        if job.prompt_mask is not None:
            values = read_label(job.prompt_mask, header, path)  # size and geometry must match the image
            if values.max(initial=0) > 255 and labels_map is None:
                raise PredictError(f"--prompt_mask {job.prompt_mask}: values above 255 (max {values.max()}); "
                                   "outputs are uint8: choose values with --labels_map")
        if job.reference is not None:
            check_label_geometry(header, _read_header(job.reference), path, job.reference)
        if args.reference is not None and job.reference is None:
            report.append(f"{name}: no reference named like the case in {args.reference}; not scored")
        jobs.append(job)
    return jobs, report


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> list[Path]:
    """Predict every planned case; returns the masks written."""
    from ..inference.runner import retain_freed_memory
    from ..inference.segmenter import Segmenter
    from .common import model_from_args

    info = runtime.setup(args, None)
    jobs, report = plan(args)
    for line in report:
        logger.warning("%s", line)
    if not jobs:
        logger.info("nothing to predict")
        return []
    opts = PredictOptions(
        modality=args.modality, task=args.task, window=_window(args.window), percentiles=tuple(args.percentiles),
        axis=args.axis, orient=args.orient, propagate=args.propagate, propagate_grow=args.propagate_grow,
        box_margin=args.box_margin,
        labels_map=parse_labels_map(args.labels_map) if args.labels_map else None,
    )
    if args.compile:
        logger.warning("--compile is not used by prediction (the prefix cache and varying batches recompile)")
    if info.device.type == "cpu" and retain_freed_memory():
        logger.info("glibc keeps freed memory for reuse (MEDSEGX_MALLOC_TUNING=0 turns this off)")
    if args.backend == "onnx":
        from ..model.onnx_runtime import OnnxModel

        model = OnnxModel.load(args.onnx_dir, model_type=args.model_type, threads=args.threads, device=info.device)
        logger.info("backend onnx: %s (weights %s)", model, model.meta.get("source", {}).get("model_weight"))
    else:
        model = model_from_args(args, info.device, args.model_weight, for_training=False)
        if args.model_weight is None:
            logger.warning("no --model_weight: the %s backbone alone (ConMoAE adapters at zero)", args.model_type)
    segmenter = Segmenter(model, info.device, batch_size=args.batch_size, use_amp=args.use_amp,
                          amp_dtype=args.amp_dtype, select=args.select, progress=not args.no_progress)
    model_info = {"model_type": args.model_type, "model_weight": args.model_weight, "backend": args.backend,
                  "onnx_dir": args.onnx_dir, "select": args.select,
                  "use_amp": bool(args.use_amp), "batch_size": args.batch_size, "device": str(info.device),
                  "propagate": args.propagate, "propagate_grow": args.propagate_grow,
                  "box_margin": args.box_margin, "git": runtime.git_revision()}
    written = []
    for job in jobs:
        prediction = segmenter.predict_job(job, opts, run_info=model_info, nsd_tolerance=args.nsd_tolerance)
        logger.info("%s: %s (%d object(s), %.1f s)", job.case, job.output, len(prediction.objects), prediction.seconds)
        written.append(job.output)
    logger.info("predicted %d case(s) into %s", len(written), args.output)
    return written


def _window(text: str | None) -> tuple[float, float] | None:
    try:
        return parse_window(text)
    except ValueError as err:
        raise PredictError(f"--window: {err}") from None
