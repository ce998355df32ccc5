"""MlxCacheOps against real mlx-lm caches of a tiny random llama (no download)."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache

from mlxkvd.kvcache import MlxCacheOps
from mlxkvd.store import CacheFileError, CacheStore

STEP = 256
LAYERS = 2


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=100,
        rope_theta=10000,
        tie_word_embeddings=True,
    )
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


@pytest.fixture
def ops():
    return MlxCacheOps()


def tokens(n, start=3):
    return [(start + 7 * i) % 100 for i in range(n)]


def prefill(model, toks, cache=None):
    """Run ``toks`` through the model; returns (cache, logits of the last position)."""
    cache = cache if cache is not None else make_prompt_cache(model)
    logits = model(mx.array([toks]), cache=cache)[0, -1]
    mx.eval(logits)
    return cache, logits


def next_logits(model, cache, token):
    return prefill(model, [token], cache)[1]


def kv_bytes_per_token(model):
    # 2 KV heads x head_dim 16 x float32, keys and values, per layer
    return LAYERS * 2 * (2 * 16 * 4)


def test_nbytes_counts_allocated_arrays_not_tokens(model, ops):
    cache, _ = prefill(model, tokens(10))
    assert ops.num_tokens(cache) == 10
    assert ops.nbytes(cache) == STEP * kv_bytes_per_token(model)
    prefill(model, tokens(300), cache)
    assert ops.num_tokens(cache) == 310
    # KVCache cuts the buffer to the 10 used tokens, then appends 2 new steps for 300 tokens.
    assert ops.nbytes(cache) == (10 + 2 * STEP) * kv_bytes_per_token(model)
    assert ops.nbytes(cache) == sum(c.keys.nbytes + c.values.nbytes for c in cache)


def test_trim_keeps_allocation_and_gives_the_logits_of_the_prefix(model, ops):
    prompt, other = tokens(30), tokens(5, start=50)
    cache, _ = prefill(model, prompt)
    before = ops.nbytes(cache)
    assert ops.can_trim(cache)
    ops.trim(cache, 12)
    assert ops.num_tokens(cache) == 18 and ops.nbytes(cache) == before
    _, got = prefill(model, other, cache)
    _, want = prefill(model, prompt[:18] + other)
    assert mx.allclose(got, want, atol=1e-5).item()


def test_copy_prefix_continues_like_a_cache_of_just_the_prefix(model, ops):
    prompt = tokens(40)
    cache, _ = prefill(model, prompt)
    copy = ops.copy_prefix(cache, 25)
    assert ops.num_tokens(copy) == 25 and ops.num_tokens(cache) == 40
    assert all(c is not s and c.keys is not s.keys for c, s in zip(copy, cache))
    assert ops.nbytes(copy) == STEP * kv_bytes_per_token(model)
    got = next_logits(model, copy, 9)
    want = next_logits(model, prefill(model, prompt[:25])[0], 9)
    assert mx.allclose(got, want, atol=1e-5).item()
    # The source is untouched by the copy and by the copy's growth.
    assert mx.allclose(next_logits(model, cache, 9),
                       next_logits(model, prefill(model, prompt)[0], 9), atol=1e-5).item()


def test_copy_prefix_of_quantized_cache(ops):
    mx.random.seed(1)
    cache = [QuantizedKVCache(group_size=32, bits=8) for _ in range(2)]
    for layer in cache:
        layer.update_and_fetch(mx.random.normal((1, 2, 10, 64)), mx.random.normal((1, 2, 10, 64)))
    copy = ops.copy_prefix(cache, 4)
    assert ops.num_tokens(copy) == 4 and ops.nbytes(copy) == ops.nbytes(cache)
    for c, s in zip(copy, cache):
        assert (c.group_size, c.bits) == (32, 8)
        for a, b in zip([*c.keys, *c.values], [*s.keys, *s.values]):
            assert mx.array_equal(a[..., :4, :], b[..., :4, :]).item()


def test_copy_prefix_refuses_part_of_a_rotating_cache(ops):
    layer = RotatingKVCache(max_size=8)
    layer.update_and_fetch(mx.zeros((1, 2, 10, 16)), mx.zeros((1, 2, 10, 16)))
    assert not ops.can_trim([layer])
    with pytest.raises(ValueError):
        ops.copy_prefix([layer], 5)


def test_save_load_round_trip(model, ops, tmp_path):
    prompt = tokens(20)
    cache, _ = prefill(model, prompt)
    path = tmp_path / "c.safetensors"
    meta = {"key": "conv", "tokens": json.dumps(prompt)}
    ops.save(path, cache, meta)
    loaded, got_meta = ops.load(path)
    assert {k: v for k, v in got_meta.items()} == meta
    assert ops.num_tokens(loaded) == 20
    assert ops.nbytes(loaded) == 20 * kv_bytes_per_token(model)  # only the used part is saved
    for a, b in zip(loaded, cache):
        assert mx.array_equal(a.keys, b.keys[..., :20, :]).item()
        assert mx.array_equal(a.values, b.values[..., :20, :]).item()
    assert mx.allclose(next_logits(model, loaded, 5), next_logits(model, cache, 5),
                       atol=1e-5).item()
    loaded_meta = ops.read_metadata(path)
    assert loaded_meta["key"] == "conv" and "checksum" in loaded_meta


def _data_start(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, 8 + n


def test_flipped_array_byte_fails_the_checksum_but_not_the_header(model, ops, tmp_path):
    cache, _ = prefill(model, tokens(20))
    path = tmp_path / "c.safetensors"
    ops.save(path, cache, {"key": "conv"})
    raw, start = _data_start(path)
    raw = bytearray(raw)
    raw[start + (len(raw) - start) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    assert ops.read_metadata(path)["key"] == "conv"  # header only: arrays are not read
    with pytest.raises(CacheFileError, match="checksum"):
        ops.load(path)


def test_tampered_metadata_fails_the_checksum(model, ops, tmp_path):
    cache, _ = prefill(model, tokens(20))
    path = tmp_path / "c.safetensors"
    ops.save(path, cache, {"key": "conv", "tokens": "[1, 2, 3]"})
    path.write_bytes(path.read_bytes().replace(b"[1, 2, 3]", b"[1, 2, 4]"))
    with pytest.raises(CacheFileError, match="checksum"):
        ops.load(path)


@pytest.mark.parametrize("keep", [4, 20, -7])
def test_truncated_file_is_detected(model, ops, tmp_path, keep):
    cache, _ = prefill(model, tokens(20))
    path = tmp_path / "c.safetensors"
    ops.save(path, cache, {"key": "conv"})
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CacheFileError):
        ops.read_metadata(path)
    with pytest.raises(CacheFileError):
        ops.load(path)


def test_store_with_real_caches_round_trips_through_disk(model, ops, tmp_path):
    prompt = tokens(40)
    store = CacheStore(ops, fingerprint="tiny", max_bytes=0, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    cache, _ = prefill(model, prompt)
    store.checkin("conv", prompt, cache)
    assert store.tier_of("conv") == "disk"
    store = CacheStore(ops, fingerprint="tiny", max_bytes=10**9, disk_dir=tmp_path,
                       max_disk_bytes=10**9)  # a restart
    edited = prompt[:30] + [1, 2]
    got = store.checkout("conv", edited)
    assert (got.source, got.cached_tokens, got.diverged_at) == ("disk", 30, 30)
    _, logits = prefill(model, edited[30:], got.cache)
    _, want = prefill(model, edited)
    assert mx.allclose(logits, want, atol=1e-5).item()
