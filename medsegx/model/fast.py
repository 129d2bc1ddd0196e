"""Fast, exact attention path for SAM's ViT blocks at 256 input (placeholder: stock computation)."""
from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition


def fast_block_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """Attention of one block on ``B x H x W x C`` normalised tokens."""
    if blk.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, blk.window_size)
        return window_unpartition(blk.attn(x), blk.window_size, pad_hw, (h, w))
    return blk.attn(x)
