"""The server's one model, with a bounded cache of image embeddings kept across requests.

:class:`CachedModel` wraps the model that :class:`~medsegx.inference.runner.SliceRunner` calls.
It has the model's interface (``forward(image, box, modal, organ)`` -> ``MedSegXOutput``,
``encode`` / ``decode``) and splits every forward into the image encoder (the costly part,
box-independent) and the prompt decoder. The encoder's output is kept in an LRU cache bounded in
bytes, keyed by the slice's pixels as the model sees them (a hash of the 256 x 256 x 3 input) and
its context rows (modality, task): the same slice with another box, a redrawn box, or the same
file opened twice is decoded only, with no second copy of the preprocessing. A model without
``encode``/``decode`` (a stand-in in tests) runs its plain forward, uncached.

The model keeps per-forward state (the adapters' context), so forwards are serialised by one lock;
everything else about a request (reading, preprocessing, write-back) runs side by side.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..model.medsegx import MedSegX, MedSegXOutput

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Least-recently-used ``key -> (embedding, gates)``, at most ``max_bytes`` of tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0

    @staticmethod
    def _size(item: tuple[torch.Tensor, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in item)

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, item: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = self._size(item)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self.bytes -= self._size(self._items.pop(key))
            self._items[key] = item
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= self._size(old)
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"slices": len(self._items), "mib": round(self.bytes / 2**20, 1),
                    "max_mib": round(self.max_bytes / 2**20, 1), "hits": self.hits, "misses": self.misses,
                    "evicted": self.evicted}

    def describe(self) -> str:
        s = self.stats()
        return (f"embedding cache: {s['slices']} slice(s), {s['mib']} of {s['max_mib']} MiB "
                f"({s['hits']} hits, {s['misses']} misses, {s['evicted']} evicted)")


def _image_keys(image: torch.Tensor) -> list[str]:
    """One digest per image of a ``B x 3 x H x W`` batch (its exact values)."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    return [hashlib.blake2b(data[i].numpy().tobytes(), digest_size=20).hexdigest() for i in range(len(data))]


class CachedModel(nn.Module):
    """``model`` with its image embeddings cached (see the module docstring)."""

    # SliceRunner's own per-case prefix cache stays off: this cache outlives a case.
    supports_prefix_cache = False

    def __init__(self, model: nn.Module, cache: EmbeddingCache) -> None:
        super().__init__()
        self.inner = model
        self.cache = cache
        self.lock = threading.RLock()
        self.cached = hasattr(model, "decode") and (hasattr(model, "encode") or isinstance(model, MedSegX))

    @property
    def config(self):
        return getattr(self.inner, "config", None)

    def _encode_uncached(self, image: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor):
        if isinstance(self.inner, MedSegX):
            return self.inner.image_encoder(self.inner.preprocess(image), modal, organ)
        return self.inner.encode(image, modal, organ)

    def encode(self, image: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor,
               cache_keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings ``B x C x h x w`` and gates ``n_adapted x B x E``, from the cache where present."""
        keys = [(k, int(m), tuple(int(v) for v in o)) for k, m, o in
                zip(_image_keys(image), modal.tolist(), organ.tolist())]
        found = {i: item for i, key in enumerate(keys) if (item := self.cache.get(key)) is not None}
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            with self.lock:
                emb, gates = self._encode_uncached(image[missing], modal[missing], organ[missing])
            for j, i in enumerate(missing):
                item = (emb[j:j + 1].detach().clone(), gates[:, j:j + 1].detach().clone())
                found[i] = item
                self.cache.put(keys[i], item)
        embeddings = torch.cat([found[i][0].to(image.device) for i in range(len(keys))])
        gate_list = [found[i][1].to(image.device) for i in range(len(keys))]
        return embeddings, torch.cat(gate_list, dim=1)

    def decode(self, embeddings: torch.Tensor, box: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            return self.inner.decode(embeddings, box, **kwargs)

    def forward(self, image: torch.Tensor, box: torch.Tensor, modal: torch.Tensor, organ: torch.Tensor,
                cache_keys: Sequence[str] | None = None) -> MedSegXOutput:
        if not self.cached:
            with self.lock:
                return self.inner(image, box, modal, organ)
        embeddings, gates = self.encode(image, modal, organ)
        masks, iou_pred = self.decode(embeddings, box.to(embeddings.device), organ=organ)
        return MedSegXOutput(masks, iou_pred, gates)
