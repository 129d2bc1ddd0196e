"""``predict.py`` / ``medsegx predict``: segment your own scans with box prompts.

    python predict.py --model_type lite -i ct.nii.gz -o out/ --modality CT --task Liver --box 40 30 5 90 80 25
    python predict.py --model_type vit_b --checkpoint ./playground/SAM \\
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth -i scans/ -o preds/ --modality CT \\
        --prompts prompts.json --use_amp
    python predict.py --model_type lite -i ct.nii.gz -o out/ --modality CT \\
        --prompt_mask rough.nii.gz --labels_map 5:Liver,1:Spleen --reference label.nii.gz --overlay

Input (-i): a volume (.nii, .nii.gz, .nrrd, .mha/.mhd), a DICOM series folder, a 2-D image
(.png, .jpg, .bmp, .tif) or a MedSegDB .npy slice, or a folder of such cases (DICOM: one series per
sub-folder). Files that are not images are reported and skipped.

Prompts (one kind per run):
  --box x0 y0 x1 y1 | x0 y0 z0 x1 y1 z1   inclusive voxel indices of the stored array as ITK-SNAP and
                                          3D Slicer show them (x = column, y = row, z = slice)
  --prompts prompts.json                  {"case": [{"box": [...], "label": 2, "task": "Spleen"}, ...]}
  --prompt_mask mask.nii.gz | folder      one box per label value per slice, from a rough mask

Output (-o, a folder): <case>.nii.gz for volumes (the input's size, spacing, origin and direction;
uint8 label values) or <case>.png for 2-D inputs; <case>.json (per slice: box, output chosen,
predicted IoU, seconds); <case>_overlay.png with --overlay. Existing outputs are kept unless
--overwrite. Preprocessing is prepare_data.py's (medsegx.data.convert) and the masks go back
through its exact inverse. The output among the model's three is chosen without a label (--select).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ..data.convert import (
    AXES,
    DEFAULT_PERCENTILES,
    IMAGE2D_EXTENSIONS,
    VOLUME_EXTENSIONS,
    WINDOW_PRESETS,
    ConversionError,
    check_image_dimensions,
    check_label_geometry,
    find_images,
    find_label,
    parse_labels_map,
    parse_window,
    read_label,
)
from ..data.taxonomy import TaxonomyError, load_taxonomy
from .case import (
    LABEL_FREE_SELECTION,
    PIXEL_ONLY_EXTENSIONS,
    PredictOptions,
    describe_scores,
    output_suffix,
    predict_case,
    read_case_image,
    score_reference,
    write_image_atomic,
    write_json_atomic,
    write_overlay,
)
from .prompts import (
    NPY_EXTENSION,
    ObjectPrompt,
    PromptError,
    case_name,
    check_box_inside,
    check_label,
    load_prompts_file,
    parse_box,
)

logger = logging.getLogger(__name__)

SUPPORTED_FILES = (*VOLUME_EXTENSIONS, *IMAGE2D_EXTENSIONS, NPY_EXTENSION)


class PredictError(ValueError):
    """A problem with the command's input found before any work: one line naming what is wrong."""


# --------------------------------------------------------------------------- arguments


class _OneDevice(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 1:
            parser.error(f"{option_string}: prediction runs on one device, got {values}")
        setattr(namespace, self.dest, values)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _percentiles(text: str) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'lower,upper', got {text!r}") from None
    if not 0.0 <= lower < upper <= 100.0:
        raise argparse.ArgumentTypeError(f"need 0 <= lower < upper <= 100, got {text!r}")
    return lower, upper


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from ..args import _model_group

    p = argparse.ArgumentParser("predict.py", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="image file, DICOM series folder, or a folder of cases")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    p.add_argument("--modality", required=True, help="taxonomy modality or alias: CT, CTA, MRI, US, Dermoscopy, ...")
    p.add_argument("--task", default=None,
                   help="taxonomy task, e.g. Liver (unknown tasks use the spare unknown-task row, with a warning)")
    prompts = p.add_argument_group("prompts (one kind per run)")
    kind = prompts.add_mutually_exclusive_group(required=True)
    kind.add_argument("--box", type=int, nargs="+", metavar="N",
                      help="x0 y0 x1 y1 (2-D) or x0 y0 z0 x1 y1 z1 (volume): inclusive voxel indices of the "
                           "stored array (x = column, y = row, z = slice)")
    kind.add_argument("--prompts", default=None, help='JSON {"case": [{"box": [...], "label": 2, "task": "Spleen"}]}')
    kind.add_argument("--prompt_mask", default=None,
                      help="a rough mask (file, or folder matched by case name): one box per label value per slice")
    prompts.add_argument("--label", type=int, default=1, help="output label value of --box")
    prompts.add_argument("--labels_map", default=None,
                         help="--prompt_mask values to use and their tasks, e.g. 5:Liver,1:Spleen,2+3:Kidney "
                              "(default: every value, with --task)")
    prompts.add_argument("--box_margin", type=_non_negative_int, default=0,
                         help="pixels of the 256 grid added to each side of boxes derived from masks")
    prompts.add_argument("--propagate", action="store_true",
                         help="3-D box: start on its middle slice, then take each slice's box from the "
                              "neighbour's predicted mask until the mask vanishes")
    pre = p.add_argument_group("preprocessing (as prepare_data.py)")
    pre.add_argument("--window", default=None,
                     help=f"CT window 'level,width' or a preset {sorted(WINDOW_PRESETS)}; default per task")
    pre.add_argument("--percentiles", type=_percentiles, default=DEFAULT_PERCENTILES,
                     help="clipping percentiles for non-CT modalities, 'lower,upper'")
    pre.add_argument("--axis", default="axial", choices=AXES, help="slicing axis")
    pre.add_argument("--orient", default="LPS", choices=("LPS", "none"), help="re-order volumes to LPS before slicing")
    out = p.add_argument_group("output")
    out.add_argument("--select", default="iou", choices=LABEL_FREE_SELECTION,
                     help="which of the 3 outputs: iou = highest predicted IoU, first = output 0 (never the label)")
    out.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    out.add_argument("--reference", default=None,
                     help="label file (or folder matched by case name): also score 3-D DSC / HD95 / NSD per object")
    out.add_argument("--nsd_tolerance", type=float, default=2.0, help="NSD tolerance (mm; pixels for 2-D images)")
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="MedSegX checkpoint; omitted = the backbone alone with adapters at zero")
    run = p.add_argument_group("runtime")
    run.add_argument("--batch_size", type=_positive_int, default=8, help="slices per forward")
    run.add_argument("--use_amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    run.add_argument("--amp_dtype", default=None, choices=["float16", "bfloat16"])
    run.add_argument("--device_ids", type=int, nargs="*", default=[0], action=_OneDevice,
                     help="the GPU to use (one); none present: the CPU")
    run.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    run.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return p


# --------------------------------------------------------------------------- planning (before any work)


@dataclass
class Job:
    case: str
    image: Path
    output: Path
    objects: list[ObjectPrompt] | None = None
    prompt_mask: Path | None = None
    reference: Path | None = None


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
        if not root.name.lower().endswith(SUPPORTED_FILES):
            raise PredictError(f"{root}: not an image file (supported: {' '.join(SUPPORTED_FILES)})")
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
            f"not an image file (supported: {' '.join(SUPPORTED_FILES)})"
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
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".medsegx-write-test-"):
            pass
    except OSError as err:
        raise PredictError(f"-o {out}: output folder is not writable ({err.strerror or err})") from None


def plan(args: argparse.Namespace) -> tuple[list[Job], list[str]]:
    """Every check that can fail before the model is built; returns the jobs and report lines."""
    load_taxonomy().canonical_modality(args.modality)  # an unknown modality: an error listing the known ones
    _window(args.window)
    out = Path(args.output)
    if args.propagate and args.prompt_mask is not None:
        raise PredictError("--propagate starts from a box (--box or --prompts), not from --prompt_mask")
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
        job = Job(name, path, output, prompt_mask=masks[name], reference=references[name])
        if box is not None:
            job.objects = [ObjectPrompt(label=args.label, box=box)]
        elif by_case is not None:
            job.objects = by_case[name]
        for obj in job.objects or ():
            check_box_inside(obj.box, header.GetSize(), f"case {name!r} ({path})")
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


def run_predict(args: argparse.Namespace) -> list[Path]:
    """Predict every planned case; returns the masks written."""
    from .. import runtime
    from ..args import model_hparams
    from ..model import build_model
    from .runner import SliceRunner, retain_freed_memory

    info = runtime.setup(args, None)
    jobs, report = plan(args)
    for line in report:
        logger.warning("%s", line)
    if not jobs:
        logger.info("nothing to predict")
        return []
    opts = PredictOptions(
        modality=args.modality, task=args.task, window=_window(args.window), percentiles=tuple(args.percentiles),
        axis=args.axis, orient=args.orient, propagate=args.propagate, box_margin=args.box_margin,
        labels_map=parse_labels_map(args.labels_map) if args.labels_map else None,
    )
    if args.compile:
        logger.warning("--compile is not used by prediction (the prefix cache and varying batches recompile)")
    if info.device.type == "cpu" and retain_freed_memory():
        logger.info("glibc keeps freed memory for reuse (MEDSEGX_MALLOC_TUNING=0 turns this off)")
    model = build_model(args.model_type, checkpoint=args.checkpoint, model_weight=args.model_weight,
                        fast=not args.no_fast, **model_hparams(args))
    model.to(info.device)
    if args.model_weight is None:
        logger.warning("no --model_weight: the %s backbone alone (ConMoAE adapters at zero)", args.model_type)
    runner = SliceRunner(model, info.device, batch_size=args.batch_size, amp=args.use_amp,
                         amp_dtype=args.amp_dtype, select=args.select)
    model_info = {"model_type": args.model_type, "model_weight": args.model_weight, "select": args.select,
                  "use_amp": bool(args.use_amp), "batch_size": args.batch_size, "device": str(info.device),
                  "propagate": args.propagate, "box_margin": args.box_margin, "git": runtime.git_revision()}
    written = []
    for job in jobs:
        image = read_case_image(job.image)
        prompt_mask = read_label(job.prompt_mask, image, job.image) if job.prompt_mask is not None else None
        prediction = predict_case(runner, job.case, image, job.image, job.objects, opts, prompt_mask,
                                  progress=not args.no_progress)
        log = {"input": str(job.image), "output": str(job.output), **prediction.log(), "run": model_info}
        if job.prompt_mask is not None:
            log["prompt_mask"] = str(job.prompt_mask)
        write_image_atomic(prediction.image, job.output)
        if job.reference is not None:
            physical = not job.image.name.lower().endswith(PIXEL_ONLY_EXTENSIONS)
            reference = read_label(job.reference, image, job.image)
            scores = score_reference(prediction, reference, physical, args.nsd_tolerance)
            log["reference"] = {"file": str(job.reference), "scores": scores}
            for line in describe_scores(job.case, scores):
                logger.info("%s", line)
        write_json_atomic(log, job.output.parent / f"{job.case}.json")
        if args.overlay:
            write_overlay(prediction, job.output.parent / f"{job.case}_overlay.png")
        logger.info("%s: %s (%d object(s), %.1f s)", job.case, job.output, len(prediction.objects), prediction.seconds)
        written.append(job.output)
    logger.info("predicted %d case(s) into %s", len(written), args.output)
    return written


def _window(text: str | None) -> tuple[float, float] | None:
    try:
        return parse_window(text)
    except ValueError as err:
        raise PredictError(f"--window: {err}") from None


USER_ERRORS = (PredictError, PromptError, ConversionError, TaxonomyError, FileNotFoundError)


def main(args: argparse.Namespace) -> list[Path]:
    """:func:`run_predict` with input errors as one line ``error: ...`` and exit status 2."""
    try:
        return run_predict(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
