"""Fast, exact attention for SAM's ViT blocks (the stock modules stay the reference).

Why this exists: at 256 input the ViT sees a 16x16 token grid. SAM's window
blocks (window 14) zero-pad that grid to 28x28 and attend inside four 14x14
windows, so qkv, attention and the output projection run on 784 tokens of
which 256 are real. Here the same result is computed on the real tokens only:

- qkv and proj run once on the unpadded ``B x H x W`` grid;
- the windows are grouped by their real extent (at 16/14: 14x14, 14x2, 2x14,
  2x2 real tokens) and each group is one ``scaled_dot_product_attention``
  attention call with the decomposed relative-position bias as an additive mask;
- the padding is NOT masked in SAM and the published weights expect that:
  after ``norm1`` a padded token is zero, so its key is the qkv key-bias and
  its value the value-bias, identical at every padded position. Only its
  rel-pos bias depends on where it sits. All padding keys of a window are
  therefore one extra key (k = key-bias, v = value-bias) whose logit gets,
  per query, ``log sum_{padded (i,j)} exp(rel_h[q, i] + rel_w[q, j])``.
  That sum is split into two disjoint rectangles (padded rows x all columns,
  real rows x padded columns), each a product of a row sum and a column sum,
  so it is exact (a sum of positive terms, no cancellation) and cheap.

The rel-pos mask is built as a matmul of per-query bias features with
per-key one-hot features (cheaper than a broadcast add on CPU). Without
autograd the attention is one ``scaled_dot_product_attention`` call; when
autograd records through it (training adapters below), it is an explicit
softmax, which measured faster than SDPA's backward with a mask that needs a
gradient. Both are exact; both run under ``torch.autocast`` (everything is cast
to q's dtype; the padding log-weights are computed in float32 first).

The result equals the stock padded computation to float rounding (float64:
~1e-15; the tests compare ViT-B logits in float32 within 1e-4 and gradients
of a tiny model). Blocks without relative positions fall back to the stock
modules (SAM always uses them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    get_rel_pos,
    window_partition,
    window_unpartition,
)


def stock_block_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """The reference: segment-anything's padded window partition and Attention."""
    if blk.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, blk.window_size)
        return window_unpartition(blk.attn(x), blk.window_size, pad_hw, (h, w))
    return blk.attn(x)


def fast_block_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """Attention of one block on ``B x H x W x C`` normalised tokens (``norm1`` output).

    Same result as :func:`stock_block_attention`, without work on padding.
    """
    attn = blk.attn
    if not attn.use_rel_pos:
        return stock_block_attention(blk, x)
    h, w = x.shape[1], x.shape[2]
    qkv = attn.qkv(x)  # B x H x W x 3C, real tokens only
    if blk.window_size > 0:
        out = _windowed_attention(attn, qkv, blk.window_size)
    else:
        out = _window_attention(attn, qkv, (h, w))
    return attn.proj(out)


def _windowed_attention(attn: Attention, qkv: torch.Tensor, window: int) -> torch.Tensor:
    """Window attention of the unpadded ``B x H x W x 3C`` qkv -> ``B x H x W x C``.

    The grid splits into full windows and, when ``window`` does not divide it,
    a strip of partial windows at the bottom and right and one corner window.
    Each kind is batched into one attention call.
    """
    b, h, w, _ = qkv.shape
    rows = _segments(h, window)
    cols = _segments(w, window)
    out_rows = []
    for r0, r1, a in rows:
        out_cols = []
        for c0, c1, bw in cols:
            region = qkv[:, r0:r1, c0:c1]
            nr, nc = (r1 - r0) // a, (c1 - c0) // bw
            # region -> (B * nr * nc) windows of a x bw real tokens, in the stock order within a window
            win = region.reshape(b, nr, a, nc, bw, -1).transpose(2, 3).reshape(b * nr * nc, a, bw, -1)
            out = _window_attention(attn, win, (window, window))
            out = out.reshape(b, nr, nc, a, bw, -1).transpose(2, 3).reshape(b, r1 - r0, c1 - c0, -1)
            out_cols.append(out)
        out_rows.append(torch.cat(out_cols, dim=2) if len(out_cols) > 1 else out_cols[0])
    return torch.cat(out_rows, dim=1) if len(out_rows) > 1 else out_rows[0]


def _segments(n: int, window: int) -> list[tuple[int, int, int]]:
    """(start, stop, real window extent) of the full windows and of the partial last one."""
    full, rest = divmod(n, window)
    segs = [(0, full * window, window)] if full else []
    if rest:
        segs.append((full * window, n, rest))
    return segs


def _window_attention(attn: Attention, qkv: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Attention of ``N x a x b x 3C`` windows whose real tokens are the top-left ``a x b``
    of a ``window`` (``wh x ww``) that the stock code zero-pads -> ``N x a x b x C``.

    A global block is the case ``(a, b) == window`` (no padding).
    """
    n, a, b, _ = qkv.shape
    wh, ww = window
    heads = attn.num_heads
    q, k, v = qkv.reshape(n, a * b, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # N x heads x ab x hd
    hd = q.shape[-1]

    # Decomposed rel-pos, as add_decomposed_rel_pos, against every key row/column of the
    # full window (the padded ones are needed for the padding key). The query rows/columns
    # are the first a/b of the window. The stock code uses the unscaled q here.
    rh = get_rel_pos(wh, wh, attn.rel_pos_h)[:a].to(q.dtype)  # a x wh x hd
    rw = get_rel_pos(ww, ww, attn.rel_pos_w)[:b].to(q.dtype)  # b x ww x hd
    qg = q.reshape(n, heads, a, b, hd)
    rel_h = torch.einsum("nhabc,akc->nhabk", qg, rh)  # N x heads x a x b x wh
    rel_w = torch.einsum("nhabc,bkc->nhabk", qg, rw)  # N x heads x a x b x ww
    # Bias features per query and one-hot features per key: the additive mask is
    # rel @ onehot^T (a small matmul; a broadcast add of rel_h and rel_w measured 3-4x slower).
    rel = [rel_h[..., :a].reshape(n, heads, a * b, a), rel_w[..., :b].reshape(n, heads, a * b, b)]
    padded = (a, b) != (wh, ww)
    if padded:
        # One key stands for all padded positions (see the module docstring).
        bias = attn.qkv.bias
        dim = heads * hd
        if bias is None:
            k_pad = v_pad = q.new_zeros(heads, hd)
        else:
            k_pad = bias[dim : 2 * dim].reshape(heads, hd).to(q.dtype)
            v_pad = bias[2 * dim :].reshape(heads, hd).to(q.dtype)
        k = torch.cat([k, k_pad[None, :, None, :].expand(n, -1, 1, -1)], dim=2)
        v = torch.cat([v, v_pad[None, :, None, :].expand(n, -1, 1, -1)], dim=2)
        rel.append(_padding_log_weight(rel_h, rel_w, a, b).reshape(n, heads, a * b, 1).to(q.dtype))
    rel = torch.cat(rel, dim=-1)  # N x heads x ab x (a + b [+ 1])
    onehot = _key_onehot(a, b, padded, q.dtype, q.device)  # (ab [+ 1]) x (a + b [+ 1])

    mask = rel @ onehot.t()  # N x heads x ab x (ab [+ 1]), in q's dtype (SDPA requires it)
    if rel.requires_grad or k.requires_grad:
        # Autograd records through this attention (adapters of lower blocks train). SDPA's
        # CPU kernels have no backward for a mask that needs a gradient and drop to a slow
        # path; the explicit softmax measured faster per training step (bf16 and fp32).
        logits = (q * attn.scale) @ k.transpose(-2, -1) + mask
        out = logits.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2).reshape(n, a, b, heads * hd)


def _key_onehot(a: int, b: int, padded: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per key: one-hot of its row (a), one-hot of its column (b) [, 1 for the padding key]."""
    rows = torch.eye(a, dtype=dtype, device=device)[:, None, :].expand(a, b, a).reshape(a * b, a)
    cols = torch.eye(b, dtype=dtype, device=device)[None, :, :].expand(a, b, b).reshape(a * b, b)
    onehot = torch.cat([rows, cols], dim=-1)
    if padded:
        onehot = F.pad(onehot, (0, 1, 0, 1))
        onehot[-1, -1] = 1
    return onehot


def _padding_log_weight(rel_h: torch.Tensor, rel_w: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``log sum exp(rel_h[..., i] + rel_w[..., j])`` over the padded positions (i, j) of the window.

    Padded = (rows >= a, any column) + (rows < a, columns >= b): two disjoint
    rectangles, each sum a product of a row sum and a column sum. Computed in
    at least float32 (the logsumexps of empty ranges are -inf, which logaddexp absorbs).
    """
    dtype = torch.promote_types(rel_h.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    rel_h, rel_w = rel_h.to(dtype), rel_w.to(dtype)
    h_real = torch.logsumexp(rel_h[..., :a], dim=-1)
    h_pad = torch.logsumexp(rel_h[..., a:], dim=-1)
    w_real = torch.logsumexp(rel_w[..., :b], dim=-1)
    w_pad = torch.logsumexp(rel_w[..., b:], dim=-1)
    w_all = torch.logaddexp(w_real, w_pad)
    return torch.logaddexp(h_pad + w_all, h_real + w_pad)
