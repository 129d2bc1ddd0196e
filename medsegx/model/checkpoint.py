"""Checkpoint I/O: Meta's SAM files, the published MedSegX format, and our own.

MedSegX format (as published)::

    {"model": {trained tensors, SAM key names}, "optimizer": ..., "epoch": int}

Files written here add, under extra keys that the published loader ignores,
everything needed to rebuild the model from the file alone (``config``,
``taxonomy_version``) and to resume a run exactly (``scaler``, ``step``,
``rng``, ``args``). Every load is all-or-nothing: a missing, unexpected or
mis-shaped key is an error that lists the keys.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.taxonomy import load_taxonomy
from ..errors import UserError
from ..fileio import atomic_write
from .config import BACKBONES
from .freeze import TASK_DECODER_PREFIX, is_trainable_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = "medsegx-ckpt/1"

# Meta's released SAM files (names registered in config.BACKBONES): name and where to get them.
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS = {name: (b.sam_file, SAM_URL + b.sam_file) for name, b in BACKBONES.items() if b.sam_file}

# Decoder parts the published loader does not take from a SAM file of another
# layout: the MedSegX file (or training) supplies them.
_FRESH_DECODER_PREFIXES = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)
# The 256 decoder's extra upscaling layers (indices 4, 6, 7, 9) have no counterpart in a 1024 SAM file.
_NEW_UPSCALING_PREFIX = "mask_decoder.output_upscaling."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model; the message says which file."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would run code when unpickled (it holds objects beyond tensors and plain data)."""


def _fmt_keys(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unsafe_types(path: Path, err: Exception) -> list[str]:
    """The pickled types torch's safe loader refused (from the file's pickle, without running it)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - fall back to the loader's message
        found = []
    return sorted(set(found)) or re.findall(r"GLOBAL ([\w.]+)", str(err))


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint safely: tensors, numbers, strings and plain containers only.

    Nothing else is ever unpickled (a pickled object can run any code): such a file is refused
    with an :class:`UnsafeCheckpointError` naming the file and the offending types. Meta's SAM
    files, the released MedSegX files, LiteMedSAM's asset and every file this project writes hold
    only plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=_zip_file(path))
    except pickle.UnpicklingError as err:
        types = _unsafe_types(path, err)
        if types:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds pickled objects of type {', '.join(types)}, which could run "
                "code; only tensors and plain data (numbers, strings, lists, dicts) are read") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)} (truncated or not a "
                              "PyTorch file?)") from None


def _zip_file(path: Path) -> bool:
    """torch.save's zip format can be memory-mapped (no copy of a 375 MB SAM file); the legacy one cannot."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def resolve_sam_checkpoint(checkpoint: str | Path, model_type: str) -> Path:
    """The SAM file for ``model_type``: ``checkpoint`` itself, or Meta's file name inside that folder."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if model_type not in SAM_CHECKPOINTS:
        raise CheckpointError(f"base checkpoint for {model_type} not found: {path} is not a file")
    name, url = SAM_CHECKPOINTS[model_type]
    if path.is_dir() or not path.suffix:
        path = path / name
    if not path.is_file():
        raise CheckpointError(
            f"SAM checkpoint for {model_type} not found at {path}. Download {name} from {url} "
            f"into {path.parent} (scripts/download-example.sh does it when online)."
        )
    return path


def _adapted_remap(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the frozen MLP of each adapted block from ``mlp.lin*`` to ``mlp.mlp.lin*`` (where ConMoAE keeps it)."""
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        if ".mlp.lin" in key and key not in own:
            moved = key.replace(".mlp.lin", ".mlp.mlp.lin")
            if moved in own:
                key = moved
        out[key] = value
    return out


def _resize_pos_embed(value: torch.Tensor, grid: int) -> torch.Tensor:
    # (1, H, W, C) -> (1, C, H, W) -> bilinear to the 256 grid -> back
    return F.interpolate(value.permute(0, 3, 1, 2), (grid, grid), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _resize_rel_pos(value: torch.Tensor, rows: int) -> torch.Tensor:
    # (L, hd) treated as a (1, 1, L, hd) image, resized along L only
    return F.interpolate(value[None, None], (rows, value.shape[1]), mode="bilinear", align_corners=False)[0, 0]


def _base_keys(model: nn.Module) -> set[str]:
    """Keys a SAM file must provide: everything except adapters and context embeddings."""
    return {k for k in model.state_dict() if "adapter" not in k and ".modal_embed." not in k and ".organ_embed." not in k
            and not k.startswith(TASK_DECODER_PREFIX)}


def load_sam_checkpoint(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a SAM state_dict (Meta's 1024 layout or already at 256) into the 256 MedSegX model.

    A file that fits is loaded as is. Otherwise (Meta's 1024 files) the
    position embedding and the global blocks' relative positions are resized
    to the 256 grid, the decoder parts the 256 decoder redefines are left to
    the MedSegX weights, and any other mismatch is an error.
    """
    name = str(source) if not isinstance(source, Mapping) else "<state_dict>"
    state = torch_load(source) if not isinstance(source, Mapping) else source
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = _adapted_remap(model, state)
    own = model.state_dict()
    base = _base_keys(model)
    unexpected = set(state) - set(own)
    if unexpected:
        raise CheckpointError(f"{name}: keys not in the SAM model: {_fmt_keys(unexpected)}")
    missing = base - set(state)
    mismatched = {k for k in base & set(state) if state[k].shape != own[k].shape}
    if not missing and not mismatched:
        _copy_into(model, {k: state[k] for k in base})
        return

    logger.info("%s is not at the 256 layout: resizing position embeddings (%d keys differ)", name, len(mismatched))
    encoder = model.image_encoder
    grid = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    load: dict[str, torch.Tensor] = {}
    problems = []
    for key in sorted(base):
        if key.startswith(_FRESH_DECODER_PREFIXES):
            continue  # left to the MedSegX file / training
        if key.startswith(_NEW_UPSCALING_PREFIX) and (key not in state or state[key].shape != own[key].shape):
            continue
        if key not in state:
            problems.append(f"missing {key}")
            continue
        value = state[key]
        if value.shape != own[key].shape:
            if key.endswith("pos_embed") and value.dim() == 4:
                value = _resize_pos_embed(value, grid)
            elif key.endswith(("rel_pos_h", "rel_pos_w")):
                value = _resize_rel_pos(value, own[key].shape[0])
        if value.shape != own[key].shape:
            problems.append(f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
            continue
        load[key] = value
    if problems:
        raise CheckpointError(f"{name} does not fit the model: " + "; ".join(problems[:12]))
    _copy_into(model, load)


def _copy_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def medsegx_keys(model: nn.Module) -> list[str]:
    """The keys of the published "model" dict: adapters, context embeddings, the whole mask decoder."""
    return [k for k in model.state_dict() if is_trainable_name(k, train_iou_head=True)]


def medsegx_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP
    state = model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in medsegx_keys(model)}


def load_medsegx_weights(model: nn.Module, source: str | Path | Mapping[str, Any], name: str | None = None
                         ) -> dict[str, Any]:
    """Overwrite the model's tensors with a MedSegX file's "model" dict (all of them, or an error).

    ``source``: a file, or a checkpoint already loaded (``name`` says where it came from). Returns
    the whole checkpoint dict (optimizer, epoch, extras) for callers that resume.
    """
    if isinstance(source, Mapping):
        name, ckpt = name or "<checkpoint>", dict(source)
    else:
        name, ckpt = str(source), torch_load(source)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: expected a dict, got {type(ckpt).__name__}")
    tensors = ckpt["model"] if "model" in ckpt else ckpt
    if not isinstance(tensors, Mapping) or not all(torch.is_tensor(v) for v in tensors.values()):
        raise CheckpointError(f"{name} is not a MedSegX checkpoint (no dict of tensors under 'model')")
    own = model.state_dict()
    expected = set(medsegx_keys(model))
    unexpected = set(tensors) - set(own)
    missing = expected - set(tensors)
    mismatched = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(tensors) & set(own)
        if tensors[k].shape != own[k].shape
    )
    if unexpected or missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append("wrong shapes: " + "; ".join(mismatched[:12]))
        raise CheckpointError(f"{name} does not fit this {getattr(model, 'config', None) and model.config.model_type} "
                              f"model: " + " | ".join(parts))
    _copy_into(model, tensors)
    return dict(ckpt)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """The published format plus our self-description (config, taxonomy version) and ``extra``.

    Only tensors and plain data: the file loads with ``weights_only=True`` anywhere.
    """
    model = getattr(model, "module", model)
    obj: dict[str, Any] = {
        "model": medsegx_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "format": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "taxonomy_version": load_taxonomy().version,
    }
    obj.update(extra)
    return obj


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, **extra: Any) -> None:
    """Write :func:`checkpoint_state` atomically to ``path``."""
    atomic_save(checkpoint_state(model, optimizer, epoch, **extra), path)
