"""SAM at 256x256 with ConMoAE, composed from the ``segment_anything`` package.

Nothing of segment-anything is edited; three classes subclass it:

- :class:`MedSegXImageEncoder` (``ImageEncoderViT``): adds the context
  embedding tables and a ConMoAE in the MLP of each adapted block, and runs
  the blocks with the context (optionally through the fast attention path).
- :class:`KeepResMaskDecoder` (``MaskDecoder``): four transposed convolutions
  so masks come out at the full 256x256, and one box per image (the stock
  ``predict_masks`` repeats every image once per prompt of the whole batch).
- :class:`MedSegX` (``Sam``): the forward of one box per image returning the
  three multimask outputs, their IoU predictions and the expert gates.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from .conmoae import AdapterContext, AdapterSpec, ConMoAE, embed_context
from .decoder_adapters import decoder_context, run_routed_decoder
from .freeze import encoder_trains


class MedSegXOutput(NamedTuple):
    """masks: ``B x K x 256 x 256`` logits; iou_pred: ``B x K``; gates: ``n_adapted x B x E``.

    K outputs as the config's ``mask_outputs`` says: 3 (tokens 1..3), 1 (token 0) or 4 (tokens 0..3).
    """

    masks: torch.Tensor
    iou_pred: torch.Tensor
    gates: torch.Tensor


def run_mask_decoder(decoder: nn.Module, mask_outputs: str, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask decoder's outputs that ``mask_outputs`` names, with their IoU predictions.

    "multimask": tokens 1..3 and "single": token 0 (segment-anything's ``multimask_output`` True /
    False); "all": every token 0..3 (``predict_masks``, which the stock forward slices). ``inputs``:
    the decoder's ``image_embeddings``, ``image_pe``, ``sparse_prompt_embeddings``, ``dense_prompt_embeddings``.
    """
    if mask_outputs == "all":
        return decoder.predict_masks(**inputs)
    if mask_outputs not in ("multimask", "single"):
        raise ValueError(f"mask_outputs must be 'multimask', 'single' or 'all', got {mask_outputs!r}")
    return decoder(**inputs, multimask_output=mask_outputs == "multimask")


class MedSegXImageEncoder(ImageEncoderViT):
    """SAM's ViT with ConMoAE adapters and the context embedding tables."""

    def __init__(
        self,
        *,
        adapted_blocks: Sequence[int] | None = None,
        adapters: AdapterSpec | None = None,
        fast: bool = True,
        **vit_kwargs,
    ) -> None:
        super().__init__(**vit_kwargs)
        embed_dim = vit_kwargs.get("embed_dim", 768)
        adapters = adapters if adapters is not None else AdapterSpec()
        tables = adapters.context_tables()
        # Registered directly on the encoder: the published keys are image_encoder.modal_embed / organ_embed.*
        self.modal_embed = tables.modal_embed
        self.organ_embed = tables.organ_embed
        self.adapted_blocks = tuple(range(len(self.blocks)) if adapted_blocks is None else sorted(adapted_blocks))
        for i in self.adapted_blocks:
            block = self.blocks[i]
            block.mlp = adapters.adapter(block.mlp, embed_dim)
        self.fast = fast

    def set_fast(self, fast: bool) -> None:
        """Fast path (SDPA, pad-aware windows, batched experts) or the stock reference modules."""
        self.fast = fast
        for i in self.adapted_blocks:
            self.blocks[i].mlp.batched_experts = fast

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x ``B x 3 x H x W`` normalised; modal ``B``; organ ``B x 4``.

        Returns the image embedding ``B x out_chans x H/16 x W/16`` and the gates
        ``n_adapted x B x E``.
        """
        ctx = embed_context(self.modal_embed, self.organ_embed, modal, organ)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        gates = []
        for blk in self.blocks:
            x, gate = self._run_block(blk, x, ctx)
            if gate is not None:
                gates.append(gate)
        x = self.neck(x.permute(0, 3, 1, 2))
        return x, torch.stack(gates) if gates else x.new_zeros(0, x.shape[0], 0)

    def _run_block(self, blk: Block, x: torch.Tensor, ctx: AdapterContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Block.forward with the context handed to the adapter; attention is
        # the stock module or the exact fast path.
        shortcut = x
        x = blk.norm1(x)
        if self.fast:
            from .fast import fast_block_attention

            x = fast_block_attention(blk, x)
        elif blk.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, blk.window_size)
            x = window_unpartition(blk.attn(x), blk.window_size, pad_hw, (h, w))
        else:
            x = blk.attn(x)
        x = shortcut + x
        if isinstance(blk.mlp, ConMoAE):
            out, gate = blk.mlp(blk.norm2(x), ctx)
            return x + out, gate
        return x + blk.mlp(blk.norm2(x)), None


class KeepResMaskDecoder(MaskDecoder):
    """SAM's mask decoder with full-resolution output and one box per image."""

    def __init__(self, *, transformer_dim: int, activation: type[nn.Module] = nn.GELU, **kwargs) -> None:
        super().__init__(transformer_dim=transformer_dim, activation=activation, **kwargs)
        d = transformer_dim
        # Four x2 upsamplings: 16x16 embeddings -> 256x256 masks (indices 0..10 as published).
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            activation(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            LayerNorm2d(d // 8),
            activation(),
            nn.ConvTranspose2d(d // 8, d // 16, kernel_size=2, stride=2),
            LayerNorm2d(d // 16),
            activation(),
            nn.ConvTranspose2d(d // 16, d // 32, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 32, 3) for _ in range(self.num_mask_tokens))

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per image: ``B`` embeddings, ``B`` boxes -> ``B x 4 x H x W`` masks, ``B x 4`` IoU."""
        batch = image_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class MedSegX(Sam):
    """SAM + ConMoAE at 256x256 with box prompts.

    ``state_dict()`` keys are those of the wrapped SAM (no prefix), as in the
    published checkpoints.
    """

    def forward(  # type: ignore[override]
        self, image: torch.Tensor, box: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor
    ) -> MedSegXOutput:
        """Args:
            image: ``B x 3 x 256 x 256`` float, 0..255 (normalised here).
            box: ``B x 4`` x_min, y_min, x_max, y_max in the 256 grid.
            modal: ``B`` modality indices; organ: ``B x 4`` [body part, subregion, organ, task].
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains(self)):
            embeddings, gates = self.image_encoder(self.preprocess(image), modal, organ)
        masks, iou_pred = self.decode(embeddings, box, organ=organ)
        return MedSegXOutput(masks, iou_pred, gates)

    def decode(self, embeddings: torch.Tensor, box: torch.Tensor, organ: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder: the outputs the config's ``mask_outputs`` names (default the
        paper's 3 multimask outputs, tokens 1..3) and their IoU predictions. ``organ`` (``B x 4``): the
        context of a model with decoder adapters (``ModelConfig.decoder_adapters``; not the paper's)."""
        sparse, dense = self.prompt_encoder(points=None, boxes=box.to(embeddings.dtype), masks=None)
        config = getattr(self, "config", None)
        with decoder_context(self, organ, box.shape[0]):
            return run_routed_decoder(self, lambda decoder, index: run_mask_decoder(
                decoder, config.mask_outputs if config is not None else "multimask",
                image_embeddings=embeddings if index is None else embeddings[index],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse if index is None else sparse[index],
                dense_prompt_embeddings=dense if index is None else dense[index],
            ), organ, box.shape[0])
