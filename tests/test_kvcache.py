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


def test_make_room_lets_the_next_prefill_write_in_place(model, ops):
    prompt, more = tokens(300), tokens(400, start=11)
    cache, _ = prefill(model, prompt)
    assert ops.nbytes_with_room(cache, 10) == ops.nbytes(cache)  # 300 of 512 used: room enough
    expected = (300 + len(more) + STEP - 1) // STEP * STEP * kv_bytes_per_token(model)
    assert ops.nbytes_with_room(cache, len(more)) == expected
    ops.make_room(cache, len(more))
    assert ops.nbytes(cache) == expected and ops.num_tokens(cache) == 300
    buffers = [c.keys.shape for c in cache]
    _, got = prefill(model, more, cache)
    assert [c.keys.shape for c in cache] == buffers  # no reallocation: written in place
    _, want = prefill(model, prompt + more)
    assert mx.allclose(got, want, atol=1e-5).item()


def test_make_room_in_a_quantized_cache_keeps_its_contents(ops):
    mx.random.seed(2)
    cache = [QuantizedKVCache(group_size=32, bits=8) for _ in range(2)]
    for layer in cache:
        layer.update_and_fetch(mx.random.normal((1, 2, 10, 64)), mx.random.normal((1, 2, 10, 64)))
    before = [[mx.array(x[..., :10, :]) for x in (*c.keys, *c.values)] for c in cache]
    predicted = ops.nbytes_with_room(cache, 600)
    ops.make_room(cache, 600)
    assert ops.nbytes(cache) == predicted and ops.num_tokens(cache) == 10
    for c, old in zip(cache, before):
        assert c.keys[0].shape[-2] == 768
        for a, b in zip((*c.keys, *c.values), old):
            assert mx.array_equal(a[..., :10, :], b).item()


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


# ------------------------------------------------------------------------ untrimmable layers


@pytest.fixture(scope="module")
def mamba_model():
    from mlx_lm.models import mamba

    mx.random.seed(2)
    m = mamba.Model(mamba.ModelArgs(
        model_type="mamba", vocab_size=100, hidden_size=32, intermediate_size=64, state_size=8,
        num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
        time_step_rank=4, tie_word_embeddings=True,
    ))
    mx.eval(m.parameters())
    return m


def continue_logits(model, cache, toks):
    """Logits after feeding ``toks`` one at a time (decode steps, as generation does)."""
    out = []
    for t in toks:
        out.append(next_logits(model, cache, t))
    return mx.stack(out)


def test_recurrent_cache_counts_no_tokens_and_is_copied_whole(mamba_model, ops):
    cache, _ = prefill(mamba_model, tokens(12))
    assert [type(c).__name__ for c in cache] == ["ArraysCache", "ArraysCache"]
    assert ops.num_tokens(cache) is None and not ops.can_trim(cache)
    assert ops.nbytes(cache) > 0
    copy = ops.copy_prefix(cache, 12)
    assert all(c is not s and c.cache[0] is not s.cache[0] for c, s in zip(copy, cache))
    got = continue_logits(mamba_model, copy, [5, 6, 7])
    want = continue_logits(mamba_model, prefill(mamba_model, tokens(12))[0], [5, 6, 7])
    assert mx.allclose(got, want, atol=1e-5).item()
    # The source did not move on with the copy: it still continues from token 12.
    assert mx.allclose(continue_logits(mamba_model, cache, [5, 6, 7]), want, atol=1e-5).item()


def test_recurrent_cache_round_trips_through_the_store(mamba_model, ops, tmp_path):
    prompt = tokens(12)
    cache, _ = prefill(mamba_model, prompt)
    reference = ops.copy_prefix(cache, 12)
    store = CacheStore(ops, fingerprint="tiny-mamba", max_bytes=0, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    store.checkin("conv", prompt, cache)  # no token count to check: the store trusts the caller
    assert store.tier_of("conv") == "disk"
    store = CacheStore(ops, fingerprint="tiny-mamba", max_bytes=10**9, disk_dir=tmp_path,
                       max_disk_bytes=10**9)  # a restart
    got = store.checkout("conv", prompt + [5])
    assert (got.source, got.cached_tokens) == ("disk", 12)
    assert [type(c).__name__ for c in got.cache] == ["ArraysCache", "ArraysCache"]
    assert mx.allclose(continue_logits(mamba_model, got.cache, [5, 6, 7]),
                       continue_logits(mamba_model, reference, [5, 6, 7]), atol=1e-5).item()
    # Regenerating from an earlier point cannot rewind a recurrent state: nothing is reused.
    store.checkin("conv", prompt + [5, 6, 7], got.cache)
    again = store.checkout("conv", prompt[:8] + [1])
    assert again.cache is None and "cannot be trimmed" in again.reason


def test_recurrent_checkpoint_survives_a_restart_and_resumes_exactly(mamba_model, ops, tmp_path):
    head, gen_prompt, reply = tokens(10), [90, 91], [4, 5, 6]
    cache, _ = prefill(mamba_model, head)
    checkpoint = (head, ops.copy_prefix(cache, len(head)))  # at the turn boundary
    prefill(mamba_model, gen_prompt + reply, cache)
    store = CacheStore(ops, fingerprint="tiny-mamba", max_bytes=10**9, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    store.checkin("conv", head + gen_prompt + reply, cache, checkpoint=checkpoint)
    assert store.flush() == 2 and store.keys() == ["conv"]
    store = CacheStore(ops, fingerprint="tiny-mamba", max_bytes=10**9, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    got = store.checkout("conv", head + gen_prompt)  # regenerate the reply
    assert (got.source, got.tier, got.cached_tokens) == ("checkpoint", "disk", len(head))
    _, logits = prefill(mamba_model, gen_prompt, got.cache)
    _, want = prefill(mamba_model, head + gen_prompt)
    assert mx.allclose(logits, want, atol=1e-5).item()


def wrapped_rotating_cache(model, n, window=16):
    cache = [RotatingKVCache(max_size=window, keep=4) for _ in range(LAYERS)]
    cache, _ = prefill(model, tokens(n), cache)
    for t in tokens(5, start=60):  # decode steps rotate in place
        next_logits(model, cache, t)
    return cache


def test_wrapped_rotating_cache_is_not_trimmable_and_copies_whole(model, ops):
    cache = wrapped_rotating_cache(model, 30)
    assert all(isinstance(c, RotatingKVCache) for c in cache)
    assert ops.num_tokens(cache) == 35 and not ops.can_trim(cache)
    with pytest.raises(ValueError):
        ops.copy_prefix(cache, 20)
    copy = ops.copy_prefix(cache, 35)
    assert all(c.keys is not s.keys and c.max_size == s.max_size for c, s in zip(copy, cache))
    got = continue_logits(model, copy, [7, 8, 9, 10])
    want = continue_logits(model, wrapped_rotating_cache(model, 30), [7, 8, 9, 10])
    assert mx.allclose(got, want, atol=1e-5).item()
    assert mx.allclose(continue_logits(model, cache, [7, 8, 9, 10]), want, atol=1e-5).item()


def test_wrapped_rotating_cache_round_trips_through_the_store(model, ops, tmp_path):
    cache = wrapped_rotating_cache(model, 30)
    held = tokens(30) + tokens(5, start=60)
    store = CacheStore(ops, fingerprint="tiny", max_bytes=0, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    store.checkin("conv", held, cache)
    store = CacheStore(ops, fingerprint="tiny", max_bytes=10**9, disk_dir=tmp_path,
                       max_disk_bytes=10**9)
    got = store.checkout("conv", held + [7])
    assert (got.source, got.cached_tokens) == ("disk", 35)
    assert not ops.can_trim(got.cache)
    want = continue_logits(model, wrapped_rotating_cache(model, 30), [7, 8, 9, 10])
    assert mx.allclose(continue_logits(model, got.cache, [7, 8, 9, 10]), want, atol=1e-5).item()
    store.checkin("conv", held, ops.copy_prefix(wrapped_rotating_cache(model, 30), 35))
    again = store.checkout("conv", held[:20] + [1])
    assert again.cache is None and "cannot be trimmed" in again.reason
