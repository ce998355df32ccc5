"""Fixed attention shapes for a cached turn's forward pass, on backends that plan per shape.

MLX's CUDA backend runs prefill attention through cuDNN, which builds an execution plan the
first time it sees a shape (query length, key length and strides, mask): 60-90 ms on an H200, as
long as the rest of a few-hundred-token turn's pass. A conversation never repeats a shape (its
cache grows every turn), so every cached turn pays it, in every MLX system alike.

Here a cached turn's new tokens are padded to a multiple of ``BUCKET_STEP`` (up to
``MAX_BUCKET``), and attention sees the cache's whole allocation, the keys past each query
masked off. The shapes then depend only on the bucket and the allocation, which the engine
grows in steps of ``ROOM_STEP`` tokens; ``warm`` builds the plans for every bucket of an
allocation while the engine is idle, so the next turn finds its plan built.

Exactness: the padding comes after the real tokens, and causal attention never lets a token see
a later one; masked keys get zero weight. The real positions' outputs are the unpadded pass's,
up to the floating-point order of kernels of another shape. The padding's keys and values are
written past the cache's offset, which is then set back: the next token overwrites them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

BUCKET_STEP = 128
MAX_BUCKET = 1024
# A cache's allocation grows by whole steps of this many tokens (and by at least MAX_BUCKET
# beyond its offset), so that a conversation keeps one allocation, and one set of shapes, for
# several turns.
ROOM_STEP = 4096


def bucket(n: int) -> int | None:
    """The padded length for ``n`` new tokens, or None if they are not padded."""
    if not 0 < n <= MAX_BUCKET:
        return None
    return -(-n // BUCKET_STEP) * BUCKET_STEP


def applies(cache: list) -> bool:
    """Whether ``cache`` (one model's layers) can take a padded pass: plain KVCache layers that
    already hold tokens (a first turn's prompt is long and chunked; padding would not pay)."""
    return all(type(c) is KVCache for c in cache) and cache[0].keys is not None and cache[0].offset > 0


def allocated(cache: list) -> int:
    return cache[0].keys.shape[-2]


def room_target(offset: int) -> int:
    """The allocation a cache holding ``offset`` tokens is given for its next turn."""
    return -(-(offset + MAX_BUCKET) // ROOM_STEP) * ROOM_STEP


class _WholeAllocation:
    """One KVCache layer as a padded pass sees it: it writes the new keys and values in place
    and hands attention the whole allocation, with the mask that hides what lies past each
    query."""

    def __init__(self, layer: KVCache, mask: mx.array):
        self.layer = layer
        self.offset = layer.offset  # rotary positions start here
        self._mask = mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.layer.update_and_fetch(keys, values)
        return self.layer.keys, self.layer.values

    def make_mask(self, *args, **kwargs) -> mx.array:
        return self._mask


def _mask(offset: int, queries: int, keys: int) -> mx.array:
    """Query i (at position offset + i) sees keys 0..offset + i."""
    return mx.arange(keys)[None, :] <= (offset + mx.arange(queries))[:, None]


def _grow(cache: list, tokens: int) -> None:
    """Reallocate every layer to hold ``tokens``, keeping what it holds."""
    for c in cache:
        n = c.offset

        def copy(x, n=n):
            out = mx.zeros((*x.shape[:-2], tokens, x.shape[-1]), dtype=x.dtype)
            out[..., :n, :] = x[..., :n, :]
            return out

        c.keys, c.values = copy(c.keys), copy(c.values)
    mx.eval([(c.keys, c.values) for c in cache])


def make_room(cache: list) -> bool:
    """Give ``cache`` the allocation ``room_target`` asks for, if it has less. True if it grew."""
    if not applies(cache):
        return False
    target = room_target(cache[0].offset)
    if allocated(cache) >= cache[0].offset + MAX_BUCKET:
        return False
    _grow(cache, target)
    return True


def forward(model, tokens: Sequence[int], cache: list) -> mx.array:
    """One pass of ``tokens`` (at most ``MAX_BUCKET``) padded to their bucket onto ``cache``
    (``applies``); the logits of the last real token, shape (1, vocab), lazy. The cache ends
    holding the real tokens only."""
    n = len(tokens)
    padded = bucket(n)
    offset = cache[0].offset
    if allocated(cache) < offset + padded:
        _grow(cache, room_target(offset))
    mask = _mask(offset, padded, allocated(cache))
    ids = mx.array([list(tokens) + [tokens[-1]] * (padded - n)], dtype=mx.uint32)
    logits = model(ids, cache=[_WholeAllocation(c, mask) for c in cache])[:, n - 1, :]
    for c in cache:
        c.offset = offset + n
    return logits


def warm(model, cache: list, stop: Callable[[], bool]) -> int:
    """Build the attention plans of every bucket for ``cache``'s allocation: one padded pass
    each, set back afterwards, so the cache holds what it held. Stops early when ``stop()``
    is true (checked between passes). Returns the passes run."""
    if not applies(cache) or allocated(cache) < cache[0].offset + MAX_BUCKET:
        return 0
    offset = cache[0].offset
    ran = 0
    for padded in range(BUCKET_STEP, MAX_BUCKET + 1, BUCKET_STEP):
        if stop():
            break
        mask = _mask(offset, padded, allocated(cache))
        ids = mx.zeros((1, padded), dtype=mx.uint32)
        out = model(ids, cache=[_WholeAllocation(c, mask) for c in cache])[:, -1, :]
        mx.eval(out, [(c.keys, c.values) for c in cache])
        for c in cache:
            c.offset = offset
        ran += 1
    return ran
