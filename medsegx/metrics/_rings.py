"""The ring search of :mod:`medsegx.metrics.surface`: nearest-edge distances by probing integer
offsets in increasing physical length, first on the bit-packed edge map, then 8 offsets per 64-bit
word test (the algorithm is described in ``surface``'s docstring)."""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

_QUERY_STEP = 1 << 16        # queries per ring-search step (bounds the gathered blocks)
_PREFILTER_AFTER = 25        # offsets probed before far-away queries are sent to the fallback
_PACKED_OFFSETS = 25         # at most this many nearest ring offsets are tested on the bit-packed map


def _blocks(n: int, start: int = 0) -> list[tuple[int, int]]:
    """Probe the ring from offset ``start`` (0, or 1 + a multiple of 8) in growing blocks
    (multiples of 8 after the zero offset): most edge pixels resolve within the first few offsets."""
    out, a = ([(0, 1)], 1) if start == 0 else ([], start)
    for size in (8, 8, 8, 8, 16, 16, 32):
        if a >= n:
            return out
        out.append((a, min(a + size, n)))
        a += size
    while a < n:
        out.append((a, min(a + 64, n)))
        a += 64
    return out


_LITTLE_ENDIAN_POPCOUNT = sys.byteorder == "little" and hasattr(np, "bitwise_count")


def _first_true_byte(words: np.ndarray) -> np.ndarray:
    """Index of the first non-zero byte in each row of ``N x M`` uint64 words (rows non-zero),
    counting bytes in memory order."""
    if not _LITTLE_ENDIAN_POPCOUNT:
        return words.view(np.uint8).reshape(words.shape[0], -1).argmax(axis=1)
    if words.shape[1] == 1:
        col = np.zeros(words.shape[0], np.int64)
        x = words[:, 0]
    else:
        col = (words != 0).argmax(axis=1)
        x = words[np.arange(words.shape[0]), col]
    # little-endian: byte j holds bits 8j..8j+7; x & -x keeps the lowest set bit, and the bits
    # below it count 8 per zero byte before it
    low = x & (~x + np.uint64(1))
    return col * 8 + (np.bitwise_count(low - np.uint64(1)) >> 3)


def _packed_stop(dist: np.ndarray) -> int:
    """How many leading ring offsets :func:`_packed_rings` tests: whole distance classes, at most
    ``_PACKED_OFFSETS``, ending where a block of :func:`_blocks` may start (1 + a multiple of 8)."""
    stop = 1
    for s in range(9, min(_PACKED_OFFSETS, dist.size - 1) + 1, 8):
        if dist[s] != dist[s - 1]:
            stop = s
    return stop


def _packed_rings(queries: np.ndarray, feat: np.ndarray, flat_off: np.ndarray, dist: np.ndarray,
                  stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The nearest features among ring offsets ``[0, stop)`` of every query, on the bit-packed
    feature map (64 pixels a word): per distance class, the OR of the map shifted by each of its
    offsets, then one bit test per remaining query. A flat offset is 64 k + r: the map shifted by r
    bits is made once per r (offsets one row apart share it when the row length is a multiple
    of 64), and shifting it by k words is a slice.

    Returns (distances, NaN where unresolved; the indices of the unresolved queries).
    """
    n_words = -(-feat.size // 64)
    packed = np.zeros(n_words * 8, np.uint8)
    packed[:-(-feat.size // 8)] = np.packbits(feat, bitorder="little")
    word_shift, bit_shift = flat_off[:stop] >> 6, flat_off[:stop] & 63  # floor division
    margin = int(np.abs(word_shift).max()) + 1
    words = np.zeros(n_words + 2 * margin, np.uint64)
    words[margin:margin + n_words] = packed.view(np.uint64)
    by_bits: dict[int, np.ndarray] = {0: words}

    def shifted(r: int) -> np.ndarray:  # bit j of word i = map bit 64 i + j + r
        if r not in by_bits:
            out = np.zeros_like(words)
            np.right_shift(words[:-1], np.uint64(r), out=out[:-1])
            out[:-1] |= words[1:] << np.uint64(64 - r)
            by_bits[r] = out
        return by_bits[r]

    q_word, q_bit = queries >> 6, (queries & 63).astype(np.uint64)
    out = np.full(queries.size, np.nan)
    act = np.arange(queries.size)
    grown = np.empty(n_words, np.uint64)
    a = 0
    while a < stop and act.size:
        b = a
        while b < stop and dist[b] == dist[a]:
            k = margin + int(word_shift[b])
            src = shifted(int(bit_shift[b]))[k:k + n_words]
            if b == a:
                grown[:] = src
            else:
                grown |= src
            b += 1
        hit = ((grown[q_word[act]] >> q_bit[act]) & np.uint64(1)).astype(bool)
        out[act[hit]] = dist[a]
        act = act[~hit]
        a = b
    return out, act


def _ring_search(queries: np.ndarray, feat: np.ndarray, flat_off: np.ndarray, dist: np.ndarray,
                 near: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-feature distance for each query flat index; unresolved queries stay NaN.

    The nearest few distance classes are tested on the bit-packed map (:func:`_packed_rings`),
    the rest of the ring by gathering 8 offsets per 64-bit word test. ``near(cur) -> bool`` says
    which queries may have a feature within the ring at all; those that may not skip the rest of
    the ring and go to the exact fallback.
    """
    first = _packed_stop(dist) if _LITTLE_ENDIAN_POPCOUNT else 0
    if first > 1:
        out, pending = _packed_rings(queries, feat, flat_off, dist, first)
    else:
        out, pending, first = np.full(queries.size, np.nan), np.arange(queries.size), 0
    unresolved = []
    blocks = _blocks(flat_off.size, first)
    for start in range(0, pending.size, _QUERY_STEP):
        act = pending[start:start + _QUERY_STEP]
        cur = queries[act]
        check = near
        for a, b in blocks:
            if a >= _PREFILTER_AFTER and check is not None:
                ok = check(cur)
                unresolved.append(act[~ok])
                act, cur = act[ok], cur[ok]
                check = None
                if act.size == 0:
                    break
            if b - a == 1:
                hit = feat[cur + flat_off[a]]
                words = None
            else:
                # 8 bools are one 64-bit word: one comparison tests 8 offsets
                words = feat[cur[:, None] + flat_off[None, a:b]].view(np.uint64)
                hit = (words[:, 0] if words.shape[1] == 1 else np.bitwise_or.reduce(words, axis=1)) != 0
            if hit.any():
                # the first hit in table order is the nearest
                out[act[hit]] = dist[a] if words is None else dist[a + _first_true_byte(words[hit])]
                miss = ~hit
                act, cur = act[miss], cur[miss]
                if act.size == 0:
                    break
        if act.size:
            unresolved.append(act)
    return out, (np.concatenate(unresolved) if unresolved else np.zeros(0, np.int64))
