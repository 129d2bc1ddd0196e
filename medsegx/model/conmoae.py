"""Contextual Mixture of Adapter Experts (ConMoAE).

One ConMoAE module replaces the MLP of a transformer block. It keeps the
block's frozen MLP and adds E bottleneck adapters ("experts") whose outputs are
mixed by a gate that sees the slice's context (modality, the organ's place in
the label tree, the task) and the pooled block input:

    out = mlp(x) + scale * sum_e gate_e * up_e(dropout(act(down_e(x))))

The module is backbone-agnostic: it only needs the MLP's input ``x`` with the
channel dimension last (``B x ... x C``), so the same class serves SAM's ViT
and LiteMedSAM's TinyViT.

Parameter names follow the published checkpoint (``adapter_down.{e}``,
``adapter_up.{e}``, ``adapter_input_embed``, ``adapter_gate``,
``adapter_organ_gate``, frozen MLP under ``mlp``) so released weights load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.taxonomy import NEUTRAL_ROW, load_taxonomy

# Tree levels embedded for the organ gate: root, body part, subregion, organ.
NUM_ORGAN_LEVELS = 4


@dataclass
class AdapterContext:
    """Context vectors shared by every adapted block of one forward pass.

    organ_levels: ``NUM_ORGAN_LEVELS x B x D`` (root, body part, subregion, organ)
    task: ``B x D``; modal: ``B x D``
    """

    organ_levels: torch.Tensor
    task: torch.Tensor
    modal: torch.Tensor


class ContextEmbedding(nn.Module):
    """The embedding tables of the context, shared by all adapted blocks.

    Lives on the image encoder as ``modal_embed`` and ``organ_embed.{0..4}``
    (root, body part, subregion, organ, task), all zero-initialised so an
    untrained model is the plain backbone.
    """

    def __init__(self, embed_dim: int, num_modalities: int, level_sizes: tuple[int, ...]) -> None:
        super().__init__()
        if len(level_sizes) != NUM_ORGAN_LEVELS + 1:
            raise ValueError(
                f"level_sizes needs {NUM_ORGAN_LEVELS + 1} entries (root, body part, subregion, organ, task), "
                f"got {level_sizes}"
            )
        self.modal_embed = nn.Embedding(num_modalities, embed_dim)
        self.organ_embed = nn.ModuleList(nn.Embedding(n, embed_dim) for n in level_sizes)
        for table in [self.modal_embed, *self.organ_embed]:
            nn.init.zeros_(table.weight)


def lookup_rows(table: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` for ``B`` indices; ``NEUTRAL_ROW`` gives a zero vector.

    The neutral entries still look row 0 up and zero it, so the table stays in
    the autograd graph even for an all-neutral batch (DDP sees no unused
    parameter) while row 0 gets no gradient from them.
    """
    neutral = index == NEUTRAL_ROW
    rows = table(index.masked_fill(neutral, 0))
    return rows.masked_fill(neutral.unsqueeze(-1), 0.0)


def embed_context(
    modal_embed: nn.Embedding, organ_embed: nn.ModuleList, modal: torch.Tensor, organ: torch.Tensor
) -> AdapterContext:
    """Look the context of a batch up in the tables.

    Args:
        modal: ``B`` modality indices.
        organ: ``B x 4`` indices [body part, subregion, organ, task]; the root
            level is implicit (row 0 for every slice). ``NEUTRAL_ROW`` (-1) at a
            level the slice's task name does not determine is embedded as zero.

    Why zero is the neutral context: every table starts at zero, so zero is
    what an untrained row holds, and both gates are linear in the embeddings.
    A zero level adds nothing to the organ gate's logits (its softmax is then
    decided by the known levels and the bias); the weight that softmax still
    gives the zero level scales no vector, so the organ summary shrinks toward
    zero ("no organ information") instead of borrowing a real organ's vector,
    and the expert gate sees that summary, the task row (the spare row 111 for
    an unknown task), the modality and the image feature. The gate's softmax is
    not renormalised over the known levels: the released gates were trained with
    all four levels present, and renormalising would feed them mixtures they
    never saw. A neutral level has no trainable row; fine-tuning adapts the
    spare task row, the known levels' rows and the gates.
    """
    if organ.dim() != 2 or organ.shape[1] != NUM_ORGAN_LEVELS:
        raise ValueError(f"organ must be B x {NUM_ORGAN_LEVELS} [body part, subregion, organ, task], got {tuple(organ.shape)}")
    root = torch.zeros_like(organ[:, 0])
    levels = [organ_embed[0](root)] + [lookup_rows(organ_embed[i + 1], organ[:, i]) for i in range(NUM_ORGAN_LEVELS - 1)]
    return AdapterContext(
        organ_levels=torch.stack(levels, dim=0),
        task=lookup_rows(organ_embed[NUM_ORGAN_LEVELS], organ[:, NUM_ORGAN_LEVELS - 1]),
        modal=modal_embed(modal),
    )


class ConMoAE(nn.Module):
    """A block MLP with a contextual mixture of adapter experts."""

    def __init__(
        self,
        mlp: nn.Module,
        dim: int,
        bottleneck_dim: int = 16,
        embed_dim: int = 16,
        num_experts: int = 4,
        dropout: float = 0.1,
        scale: float = 0.1,
        batched_experts: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = mlp
        self.num_experts = num_experts
        self.adapter_down = nn.ModuleList(nn.Linear(dim, bottleneck_dim) for _ in range(num_experts))
        self.adapter_up = nn.ModuleList(nn.Linear(bottleneck_dim, dim) for _ in range(num_experts))
        for up in self.adapter_up:
            # Zero up projections: at initialisation every block is exactly the backbone's.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_input_embed = nn.Linear(dim, embed_dim)
        self.adapter_gate = nn.Linear(NUM_ORGAN_LEVELS * embed_dim, num_experts)
        self.adapter_organ_gate = nn.Linear(NUM_ORGAN_LEVELS * embed_dim, NUM_ORGAN_LEVELS)
        self.adapter_act = nn.GELU()
        self.adapter_dropout = nn.Dropout(dropout)
        # A constant, not a parameter or buffer: the published checkpoints do not store it.
        self.scale = scale
        # Batched: the E experts as two matmuls over stacked weights (same parameters
        # and keys); the loop is the literal definition, kept as the reference.
        self.batched_experts = batched_experts

    def gate(self, x: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        """Expert weights ``B x E`` for block input ``x`` (``B x ... x C``)."""
        levels = ctx.organ_levels  # L x B x D
        organ_weights = F.softmax(self.adapter_organ_gate(torch.cat(list(levels), dim=-1)), dim=-1)  # B x L
        organ = torch.einsum("bl,lbd->bd", organ_weights, levels)
        pooled = x.flatten(1, -2).mean(dim=1)  # B x C
        feature = self.adapter_input_embed(pooled)
        return F.softmax(self.adapter_gate(torch.cat([organ, ctx.task, ctx.modal, feature], dim=-1)), dim=-1)

    def experts(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``sum_e gate_e * expert_e(x)`` for ``x`` of shape ``B x ... x C``."""
        if not self.batched_experts:
            out = 0
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            for e in range(self.num_experts):
                h = self.adapter_dropout(self.adapter_act(self.adapter_down[e](x)))
                out = out + gate[:, e].reshape(shape) * self.adapter_up[e](h)
            return out
        batch, channels = x.shape[0], x.shape[-1]
        tokens = x.reshape(batch, -1, channels)
        w_down = torch.cat([m.weight for m in self.adapter_down], dim=0)  # (E*r) x C
        b_down = torch.cat([m.bias for m in self.adapter_down], dim=0)
        h = self.adapter_dropout(self.adapter_act(F.linear(tokens, w_down, b_down)))  # B x N x (E*r)
        # up is linear, so gating its input equals gating its output: fold the
        # gate into h and sum the E experts in one matmul.
        rank = h.shape[-1] // self.num_experts
        h = (h.view(batch, -1, self.num_experts, rank) * gate[:, None, :, None].to(h.dtype)).flatten(2)
        w_up = torch.cat([m.weight for m in self.adapter_up], dim=1)  # C x (E*r)
        b_up = torch.stack([m.bias for m in self.adapter_up], dim=0)  # E x C
        out = torch.matmul(h, w_up.t().to(h.dtype)) + (gate.to(b_up.dtype) @ b_up)[:, None, :].to(h.dtype)
        return out.reshape(x.shape)

    def forward(self, x: torch.Tensor, ctx: AdapterContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block MLP output with adapters, expert gates ``B x E``)."""
        gate = self.gate(x, ctx)
        return self.mlp(x) + self.scale * self.experts(x, gate), gate


@dataclass(frozen=True)
class AdapterSpec:
    """The ConMoAE and context-table hyper-parameters, the same for every backbone.

    Defaults are the paper's (E=4 experts, bottleneck 16, embedding dim D=16) with the table
    sizes of the label tree (``taxonomy.json``: 10 modalities; root, 5 body parts, 12 subregions,
    39 organs, 112 tasks). :meth:`medsegx.model.config.ModelConfig.adapter_spec` builds the one of a
    model.
    """

    bottleneck_dim: int = 16
    embed_dim: int = 16
    num_experts: int = 4
    num_modalities: int = field(default_factory=lambda: load_taxonomy().num_modalities)
    level_sizes: tuple[int, ...] = field(default_factory=lambda: load_taxonomy().organ_level_sizes)
    dropout: float = 0.1
    scale: float = 0.1

    def context_tables(self) -> ContextEmbedding:
        return ContextEmbedding(self.embed_dim, self.num_modalities, tuple(self.level_sizes))

    def adapter(self, mlp: nn.Module, dim: int, cls: type[ConMoAE] = ConMoAE) -> ConMoAE:
        """``cls`` (ConMoAE or a subclass) around a block's MLP of width ``dim``."""
        return cls(mlp, dim, bottleneck_dim=self.bottleneck_dim, embed_dim=self.embed_dim,
                   num_experts=self.num_experts, dropout=self.dropout, scale=self.scale)
