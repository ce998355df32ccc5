"""Fixed attention shapes for a cached turn's forward pass, on backends that plan per shape.

MLX's CUDA backend runs prefill attention through cuDNN, which builds an execution plan the
first time it sees a shape (query length, key length and strides): 60-90 ms on an H200, as long
as the rest of a few-hundred-token turn's pass. A conversation never repeats a shape (its cache
grows every turn), so every cached turn pays it, in every MLX system alike.

Here a cached turn's pass covers whole blocks of ``BLOCK`` positions: it starts at the block
boundary at or before the cache's offset and ends at the boundary at or after its last new
token. The positions before the offset are queries only (their keys and values stay the stored
ones), those after the last token are padding; their outputs are dropped. The pass's shapes then
depend on a block index and a block count, both known when a turn ends: ``warm`` builds the plans
for the next turn's likely shapes while the engine is idle, so the next turn finds its plan
built. Attention stays the causal kernel: the pass's last query sits at its last key.

Exactness: a new token attends to exactly the keys and values it would without the blocks (the
stored ones, then the new ones up to itself); what differs is the length of the matrices its
row belongs to, so its outputs equal the plain pass's up to the floating-point order of kernels
of another shape. The padding's keys and values are written past the cache's offset, which is
then set back: the next token overwrites them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .heads import OnePosition
from .kvcache import MlxCacheOps

BLOCK = 128
MAX_BLOCKS = 8  # passes of more blocks run as they are (their plan is a smaller share of them)
# How far back from a cache's end the next turn may start: where the next prompt re-tokenizes
# the end of the reply differently (see the engine's tail re-prefill).
TAIL = 16


def span(offset: int, new: int) -> tuple[int, int] | None:
    """(start, length) of the blocked pass for ``new`` tokens after ``offset``, or None when it
    would cover more than ``MAX_BLOCKS``."""
    start = offset // BLOCK * BLOCK
    end = -(-(offset + new) // BLOCK) * BLOCK
    return (start, end - start) if end - start <= MAX_BLOCKS * BLOCK else None


def applies(cache: list) -> bool:
    """Whether ``cache`` (one model's layers) can take a blocked pass: plain KVCache layers that
    already hold tokens (a first turn's prompt is long and chunked; blocks would not pay)."""
    return all(type(c) is KVCache for c in cache) and cache[0].keys is not None and cache[0].offset > 0


def allocated(cache: list) -> int:
    return cache[0].keys.shape[-2]


class _Blocked:
    """One KVCache layer as a blocked pass sees it: the pass's queries start at ``start``; the
    keys and values from the layer's offset to ``end`` are written (``write``) or left as they
    are (a warm-up pass, whose outputs are dropped), and attention sees the layer's first
    ``end`` positions."""

    def __init__(self, layer: KVCache, start: int, end: int, write: bool):
        self.layer = layer
        self.offset = start  # rotary positions start here
        self._end = end
        self._write = write

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        layer, end = self.layer, self._end
        if self._write:
            skip = layer.offset - self.offset  # positions already stored
            layer.keys[..., layer.offset : end, :] = keys[..., skip:, :]
            layer.values[..., layer.offset : end, :] = values[..., skip:, :]
        return layer.keys[..., :end, :], layer.values[..., :end, :]

    def make_mask(self, *args, **kwargs) -> str:
        return "causal"  # the last query is at the last key


def forward(head: OnePosition, tokens: Sequence[int], cache: list) -> mx.array | None:
    """One blocked pass of ``tokens`` onto ``cache`` (which ``applies``) through ``head``'s
    model: the logits of the last token, shape (1, vocab), lazy; None (nothing done) when the
    pass would be too long. The cache ends holding the tokens."""
    offset, n = cache[0].offset, len(tokens)
    blocked = span(offset, n)
    if blocked is None or n == 0:
        return None
    start, length = blocked
    MlxCacheOps().make_room(cache, start + length - offset)  # no-op where the room was made
    before = offset - start
    ids = [tokens[0]] * before + list(tokens) + [tokens[-1]] * (length - before - n)
    views = [_Blocked(c, start, start + length, write=True) for c in cache]
    logits = head.logits(mx.array([ids], dtype=mx.uint32), views, before + n - 1)
    for c in cache:
        c.offset = offset + n
    return logits


def likely_spans(offset: int, allocation: int, first: int | None = None) -> list[tuple[int, int]]:
    """The (start, length) spans of a next turn after a cache of ``offset`` tokens in an
    allocation of ``allocation``, most likely first: its start block (or the one before, if the
    next prompt may start up to ``TAIL`` tokens earlier), every length up to ``MAX_BLOCKS``,
    ordered by distance from ``first`` (the last turn's length) when given."""
    starts = sorted({offset // BLOCK * BLOCK, max(0, offset - TAIL) // BLOCK * BLOCK}, reverse=True)
    lengths = [b * BLOCK for b in range(1, MAX_BLOCKS + 1)]
    if first is not None:
        lengths.sort(key=lambda length: (abs(length - first), length))
    return [(s, length) for length in lengths for s in starts
            if s + length > offset and s + length <= allocation]


def warm(model, cache: list, spans: Sequence[tuple[int, int]], stop: Callable[[], bool]) -> int:
    """Build the attention plans of ``spans`` for ``cache``'s allocation: one pass of each that
    writes nothing (its outputs dropped), so the cache holds what it held. Where the model's
    first layer can be called alone, only it runs (every layer has the same attention shapes);
    else the whole model does. Stops early when ``stop()`` is true (checked between passes).
    Returns the passes run."""
    if not applies(cache):
        return 0
    first = _first_layer(model)
    ran = 0
    for start, length in spans:
        if stop():
            break
        ids = mx.zeros((1, length), dtype=mx.uint32)
        if first is None:
            views = [_Blocked(c, start, start + length, write=False) for c in cache]
            mx.eval(model(ids, cache=views)[:, -1, :])
        else:
            embed, layer = first
            h = embed(ids)
            mx.eval(layer(h, "causal", cache=_Blocked(cache[0], start, start + length, write=False)))
        ran += 1
    return ran


def _first_layer(model):
    """(the token embedding, the first decoder layer) of an mlx-lm model laid out as most are
    (``model.model.embed_tokens``, ``model.layers``, each layer called ``layer(h, mask, cache=)``
    with a ``self_attn``), else None."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    layers = getattr(model, "layers", None)
    if embed is None or not layers or not hasattr(layers[0], "self_attn"):
        return None
    return embed, layers[0]
