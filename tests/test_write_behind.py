"""Writes behind in the background: a cache's file is written by a thread from a copy, while the
engine serves turns; the tiers put it in place afterwards.

Real MLX caches and files throughout. A slow disk is stood in for by ``GatedOps``, whose
``save`` (the real one) only starts once its gate is opened, so that "while the file is being
written" is a state a test can hold, not a race.
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlxkvd.kvcache import MlxCacheOps
from mlxkvd.store import CacheStore

WAIT_S = 60


class GatedOps(MlxCacheOps):
    """MlxCacheOps whose writes wait for ``gate`` (set: they run at once)."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()  # a save has started waiting at the gate
        self.saved = threading.Event()  # a save has written its file
        self.saves = 0

    def save(self, path, cache, metadata):
        self.writing.set()
        assert self.gate.wait(WAIT_S)
        self.saves += 1
        super().save(path, cache, metadata)
        self.saved.set()


@pytest.fixture(scope="module")
def model():
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128)
    mx.random.seed(7)
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


def prefill(model, tokens, cache=None):
    cache = cache if cache is not None else make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def logits_after(model, cache, token):
    return model(mx.array([[token]]), cache=cache)[0, -1]


def finish_writing(store):
    """Look again, as the idle engine does, until the write in the background is in place."""
    deadline = time.monotonic() + WAIT_S
    while store.writing:
        assert time.monotonic() < deadline
        store.persist_next()
        time.sleep(0.01)


def make_store(ops, tmp_path, max_bytes=10**9):
    return CacheStore(ops, fingerprint="tiny", max_bytes=max_bytes, disk_dir=tmp_path, max_disk_bytes=10**9)


def test_a_snapshot_is_written_as_the_cache_was_when_it_was_taken(model, tmp_path):
    ops = MlxCacheOps()
    cache = prefill(model, list(range(3, 23)))
    ops.make_room(cache, 300)  # an allocation larger than what is held
    snapshot = ops.snapshot(cache)
    reference = prefill(model, list(range(3, 23)))
    prefill(model, [40, 41, 42], cache)  # the cache goes on after the snapshot
    ops.save(tmp_path / "a.safetensors", snapshot, {"k": "v"})
    loaded, metadata = ops.load(tmp_path / "a.safetensors")
    assert metadata["k"] == "v" and loaded[0].offset == 20
    assert mx.allclose(logits_after(model, loaded, 5), logits_after(model, reference, 5), atol=1e-5).item()


def test_a_cache_of_other_layers_has_no_snapshot():
    from mlx_lm.models.cache import RotatingKVCache

    assert MlxCacheOps().snapshot([RotatingKVCache(max_size=8)]) is None


def test_a_turn_checks_its_conversation_out_and_in_while_its_file_is_written(model, tmp_path):
    ops = GatedOps()
    store = make_store(ops, tmp_path)
    held = list(range(3, 23))
    store.checkin("conv", held, prefill(model, held))
    ops.gate.clear()
    assert store.persist_next()  # started, in a thread held at the gate
    assert ops.writing.wait(WAIT_S) and store.writing
    assert store.stats()["memory"]["in_flight_bytes"] > 0  # the copy is reserved
    # The next turn, meanwhile: the resident cache, not the disk (nothing waits for the gate).
    got = store.checkout("conv", held + [30, 31])
    assert (got.source, got.tier, got.cached_tokens) == ("conversation", "memory", 20)
    prefill(model, [30, 31], got.cache)
    store.checkin("conv", held + [30, 31], got.cache)
    assert not store.persist_next() and store.writing  # still at the gate: nothing done
    ops.gate.set()
    finish_writing(store)
    assert store.stats()["memory"]["in_flight_bytes"] == 0
    # On disk: the history as it was when the write began; the newer one is written next.
    got = make_store(MlxCacheOps(), tmp_path).checkout("conv", held + [30, 31])
    assert (got.source, got.cached_tokens) == ("disk", 20)
    assert store.persist_next()
    finish_writing(store)
    assert store.flush() == 0  # nothing left to write
    got = make_store(MlxCacheOps(), tmp_path).checkout("conv", held + [30, 31, 50])
    assert (got.source, got.cached_tokens) == ("disk", 22)


def test_a_conversation_deleted_while_its_file_is_written_stays_deleted(model, tmp_path):
    ops = GatedOps()
    store = make_store(ops, tmp_path)
    store.checkin("conv", list(range(3, 23)), prefill(model, list(range(3, 23))))
    ops.gate.clear()
    assert store.persist_next() and ops.writing.wait(WAIT_S)
    threading.Timer(0.2, ops.gate.set).start()  # the delete waits for the write, then removes it
    assert store.delete("conv")
    assert not store.writing and "conv" not in store.keys()
    assert make_store(MlxCacheOps(), tmp_path).keys() == []


def test_flush_at_shutdown_waits_for_the_write_in_the_background(model, tmp_path):
    ops = GatedOps()
    store = make_store(ops, tmp_path)
    for key in ("a", "b"):
        store.checkin(key, list(range(3, 23)), prefill(model, list(range(3, 23))))
    ops.gate.clear()
    assert store.persist_next() and ops.writing.wait(WAIT_S)
    threading.Timer(0.2, ops.gate.set).start()
    assert store.flush() == 1  # the other one; the one in the background is settled first
    assert sorted(make_store(MlxCacheOps(), tmp_path).keys()) == ["a", "b"]


def test_a_copy_that_does_not_fit_the_memory_budget_is_written_at_once(model, tmp_path):
    ops = GatedOps()
    cache = prefill(model, list(range(3, 23)))
    nbytes = ops.nbytes(cache)
    store = make_store(ops, tmp_path, max_bytes=nbytes + nbytes // 2)  # room for the cache, not a copy
    store.checkin("conv", list(range(3, 23)), cache)
    assert store.persist_next() and not store.writing and ops.saves == 1
    assert make_store(MlxCacheOps(), tmp_path).keys() == ["conv"]


def test_the_engine_serves_a_turn_while_the_last_ones_cache_is_written(tmp_path, model_dir):
    """The conversation's next turn arrives while its cache's file is being written (held at
    the gate): it reuses the resident cache and finishes before the write does."""
    from bench.models import LlamaShape, build_random_model
    from mlxkvd.conversations import ConversationRegistry
    from mlxkvd.engine import Engine
    from mlxkvd.runtime import ModelRuntime, Sampling
    from mlxkvd.turns import Turns
    from test_engine_batch import host_for, outcome

    shape = LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128)
    runtime = ModelRuntime(build_random_model(tmp_path / "tiny-llama", shape, model_dir))
    ops = GatedOps()
    store = CacheStore(ops, fingerprint=runtime.fingerprint, max_bytes=1 << 30, disk_dir=tmp_path / "disk",
                       max_disk_bytes=1 << 30)
    registry = ConversationRegistry()
    engine = Engine(runtime, store, registry, write_behind_delay_s=0.05, max_batch=1)
    turns = Turns(engine, registry, host_for(engine))
    engine.start()
    try:
        ops.gate.clear()
        first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
        _, _, done = outcome(turns.submit("conv", first, [], reset=True, base_revision=0, sampling=Sampling(),
                                          max_tokens=8))
        assert ops.writing.wait(WAIT_S)  # the idle engine started writing it behind
        _, _, again = outcome(turns.submit("conv", [{"role": "user", "content": "And again?"}], [], reset=False,
                                           base_revision=done.revision, sampling=Sampling(), max_tokens=8))
        assert again.cached_tokens > 0 and ops.saves == 0  # done while the file waited at the gate
        ops.gate.set()
        deadline = time.monotonic() + WAIT_S
        while store.writing or store.tier_of("conv") != "memory" or ops.saves < 2:
            assert time.monotonic() < deadline  # both revisions get written behind
            time.sleep(0.02)
    finally:
        ops.gate.set()
        engine.stop(grace_s=30)
    reopened = CacheStore(MlxCacheOps(), fingerprint=runtime.fingerprint, max_bytes=1 << 30,
                          disk_dir=tmp_path / "disk", max_disk_bytes=1 << 30)
    assert reopened.tier_of("conv") == "disk"


def test_a_finished_write_frees_its_copys_reservation_for_the_next_turn(model, tmp_path):
    ops = GatedOps()
    store = make_store(ops, tmp_path)
    store.checkin("conv", list(range(3, 23)), prefill(model, list(range(3, 23))))
    budget = store.memory_budget
    assert store.persist_next() and not store.can_reserve(budget)  # the copy holds its bytes
    assert ops.saved.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not store.can_reserve(budget):  # settles the write once its thread is done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not store.writing
