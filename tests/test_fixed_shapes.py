"""Cached turns in whole blocks of positions, their shapes planned while idle (fixed_shapes.py).

On by default only where the backend builds an attention plan per shape (CUDA); here, on the
CPU, turned on in process so that its arithmetic and bookkeeping are checked with the real
default model: replies equal mlx-lm's from the full prompt without a cache, the cache holds
exactly what a plain pass leaves, a warm-up pass changes nothing, and the next turn's shape is
among those planned.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from conftest import served_in_process, wait_for
from mlxkv import Client
from mlxkvd import fixed_shapes
from mlxkvd.fixed_shapes import BLOCK, MAX_BLOCKS
from mlxkvd.kvcache import MlxCacheOps


def test_a_span_covers_whole_blocks_from_the_offset_to_the_last_token():
    assert fixed_shapes.span(1000, 300) == (896, 512)  # 896 <= 1000, 1300 <= 1408
    assert fixed_shapes.span(1024, 128) == (1024, 128)
    assert fixed_shapes.span(1023, 2) == (896, 256)
    assert fixed_shapes.span(5, 1) == (0, 128)
    # More than MAX_BLOCKS blocks: the pass runs as it is.
    assert fixed_shapes.span(0, MAX_BLOCKS * BLOCK) == (0, MAX_BLOCKS * BLOCK)
    assert fixed_shapes.span(1, MAX_BLOCKS * BLOCK) is None


def test_likely_spans_start_at_the_end_or_just_before_and_fit_the_allocation():
    spans = fixed_shapes.likely_spans(1000, 2048, first=512)
    assert spans[0] == (896, 512)
    assert all(start in (896,) for start, _ in spans)  # 1000 - TAIL is in the same block
    assert all(start + length <= 2048 and start + length > 1000 for start, length in spans)
    assert {length for _, length in spans} == {b * BLOCK for b in range(1, 9)}
    lengths = [length for _, length in spans]
    assert lengths[:3] == [512, 384, 640]  # nearest to the last turn's first
    # Near a block boundary the next prompt may start in the block before.
    starts = {start for start, _ in fixed_shapes.likely_spans(1027, 4096)}
    assert starts == {1024, 896}
    assert fixed_shapes.likely_spans(1000, 1000) == []  # no room: nothing fits


@pytest.fixture(scope="module")
def runtime(model_dir):
    from mlxkvd.runtime import ModelRuntime

    runtime = ModelRuntime(model_dir)
    runtime.fixed_shapes = True
    return runtime


def _prefilled(runtime, tokens):
    cache = runtime.make_cache()
    runtime.prefill(tokens, cache)
    return cache


def _snapshot(cache):
    return [(c.offset, mx.array(c.keys), mx.array(c.values)) for c in cache]


def test_a_blocked_pass_equals_a_plain_one_and_leaves_the_same_cache(runtime):
    history = [(i * 37) % 4000 + 100 for i in range(1000)]
    new = [(i * 53) % 4000 + 100 for i in range(300)]
    plain = _prefilled(runtime, history)
    blocked = _prefilled(runtime, history)
    plain_logits = runtime.model(mx.array([new], dtype=mx.uint32), cache=plain)[:, -1, :]
    blocked_logits = fixed_shapes.forward(runtime.head, new, blocked)
    assert blocked_logits is not None
    # Equal up to the floating-point order of matrices of another length (float32 here: the
    # logits differ by ~3e-5 of ~20), and the same greedy token.
    assert mx.allclose(plain_logits, blocked_logits, rtol=0, atol=1e-3).item()
    assert mx.argmax(plain_logits).item() == mx.argmax(blocked_logits).item()
    assert [c.offset for c in blocked] == [1300] * len(blocked)
    for p, b in zip(plain, blocked):
        # The history's keys and values are the stored ones, untouched.
        assert mx.array_equal(p.keys[..., :1000, :], b.keys[..., :1000, :]).item()
        assert mx.array_equal(p.values[..., :1000, :], b.values[..., :1000, :]).item()
        assert mx.allclose(p.keys[..., :1300, :], b.keys[..., :1300, :], rtol=0, atol=1e-3).item()
        assert mx.allclose(p.values[..., :1300, :], b.values[..., :1300, :], rtol=0, atol=1e-3).item()


def test_a_warm_up_changes_nothing_and_stops_when_asked(runtime):
    cache = _prefilled(runtime, [(i * 37) % 4000 + 100 for i in range(700)])
    MlxCacheOps().make_room(cache, MAX_BLOCKS * BLOCK)  # as the idle engine does
    before = _snapshot(cache)
    spans = fixed_shapes.likely_spans(700, fixed_shapes.allocated(cache))
    assert len(spans) == MAX_BLOCKS
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    assert fixed_shapes.warm(runtime.model, cache, spans, stop) == 3
    for (offset, keys, values), c in zip(before, cache):
        assert c.offset == offset
        assert mx.array_equal(keys, c.keys).item() and mx.array_equal(values, c.values).item()


@pytest.fixture(scope="module")
def daemon(runtime):
    with served_in_process(runtime) as (_, socket_path):
        yield socket_path


def test_cached_turns_in_blocks_equal_the_reference_and_find_their_shape_planned(daemon, runtime, reference):
    """Turns of different sizes (one of several prefill chunks): each reply
    equals mlx-lm's from the full prompt without a cache, each turn reuses all the previous
    one left, and each blocked pass's shape was among those the idle engine planned."""
    stats = runtime.shape_stats
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    sizes = [40, 200, 5, 600, 90, 330]
    with Client(daemon, timeout=300) as client:
        chat = client.conversation("blocks", system="You answer in one short sentence.")
        held = 0
        for n, size in enumerate(sizes):
            before = dict(stats)
            message = " ".join(words[(n + i) % len(words)] for i in range(size)) + " Which word is first?"
            turn = chat.send(message, max_tokens=6)
            assert reference.generate(chat.messages[:-1], max_tokens=6) == list(turn.token_ids), n
            if n:
                assert turn.cached_tokens == held, (n, turn.cached_tokens, held)
                # The turn ran in blocks, its shape planned, unless it took more than one
                # prefill chunk (the last one starts wherever the others ended) or more
                # than MAX_BLOCKS blocks.
                new = turn.prompt_tokens - turn.cached_tokens
                planned = new <= runtime.prefill_step and fixed_shapes.span(held, new) is not None
                assert stats["blocked"] - before["blocked"] == planned, (n, new, stats)
            held = turn.prompt_tokens + turn.completion_tokens
            # Idle after the turn, the engine plans the next turn's likely shapes.
            wait_for(lambda: stats["warm_ups"] > before["warm_ups"], interval=0.01)
    assert stats["blocked"] == len(sizes) - 2  # all but the first turn and the 600-word one (two chunks)
