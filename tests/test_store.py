"""The cache store's rules, with fake caches: no model, no MLX, fast.

A fake cache is its token list; its allocated size grows in STEP-token steps like mlx-lm's
KVCache, so byte budgets are checked against allocation, not tokens used. Because a fake cache
*is* its tokens, every handover can be checked exactly: the cache holds tokens[:cached_tokens].
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mlxkvd.store import CacheFileError, CacheStore, common_prefix_length

STEP = 16  # tokens per allocation step
BYTES_PER_TOKEN = 10
FP = "model-a"


def alloc(n: int) -> int:
    return (n + STEP - 1) // STEP * STEP


class FakeCache:
    def __init__(self, tokens=(), trimmable=True, capacity=None):
        self.tokens = list(tokens)
        self.trimmable = trimmable
        self.capacity = alloc(len(self.tokens)) if capacity is None else capacity

    def extend(self, tokens):
        self.tokens += list(tokens)
        self.capacity = max(self.capacity, alloc(len(self.tokens)))


class FakeOps:
    """``CacheOps`` over FakeCache; files are JSON with a checksum over metadata and tokens."""

    file_suffix = ".json"

    def __init__(self):
        self.fail_save: Exception | None = None
        self.loads = 0

    def nbytes(self, cache):
        return cache.capacity * BYTES_PER_TOKEN

    def num_tokens(self, cache):
        return len(cache.tokens)

    def can_trim(self, cache):
        return cache.trimmable

    def trim(self, cache, n):
        assert cache.trimmable and 0 <= n <= len(cache.tokens)
        del cache.tokens[len(cache.tokens) - n :]

    def copy_prefix(self, cache, n):
        if not cache.trimmable and n != len(cache.tokens):
            raise ValueError("cannot copy part of an untrimmable cache")
        return FakeCache(cache.tokens[:n], cache.trimmable)

    @staticmethod
    def _checksum(metadata, tokens):
        return hashlib.sha256(json.dumps([sorted(metadata.items()), tokens]).encode()).hexdigest()

    def save(self, path, cache, metadata):
        body = json.dumps(
            {
                "metadata": metadata,
                "tokens": cache.tokens,
                "trimmable": cache.trimmable,
                "checksum": self._checksum(metadata, cache.tokens),
            }
        )
        with open(path, "w") as f:
            if self.fail_save is not None:
                f.write(body[: len(body) // 2])  # a partial write, then the failure
                raise self.fail_save
            f.write(body)

    def _read(self, path):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CacheFileError(str(e)) from e

    def load(self, path):
        self.loads += 1
        data = self._read(path)
        if data["checksum"] != self._checksum(data["metadata"], data["tokens"]):
            raise CacheFileError("checksum mismatch")
        return FakeCache(data["tokens"], data["trimmable"]), data["metadata"]

    def read_metadata(self, path):
        return self._read(path)["metadata"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_store(tmp_path=None, *, ops=None, max_bytes=10**9, max_disk_bytes=10**9, fp=FP, **kw):
    return CacheStore(
        ops or FakeOps(),
        fingerprint=fp,
        max_bytes=max_bytes,
        disk_dir=tmp_path,
        max_disk_bytes=max_disk_bytes if tmp_path is not None else 0,
        **kw,
    )


def seq(n, start=1):
    return list(range(start, start + n))


def put(store, key, tokens, trimmable=True):
    store.checkin(key, tokens, FakeCache(tokens, trimmable))


def disk_files(path):
    return sorted(p.name for p in Path(path).iterdir())


def file_for(path, key, fp=FP):
    return Path(path) / (hashlib.sha256(f"{fp}\x00{key}".encode()).hexdigest() + ".json")


# ------------------------------------------------------------------------------ own history


def test_common_prefix_length_across_blocks():
    a = list(range(1000))
    assert common_prefix_length(a, a) == 1000
    assert common_prefix_length(a, a[:700]) == 700
    b = a.copy()
    b[513] = -1
    assert common_prefix_length(a, b) == 513
    assert common_prefix_length([], a) == 0


def test_own_entry_is_handed_over_without_copy_and_removed():
    store = make_store()
    cache = FakeCache(seq(40))
    store.checkin("c", seq(40), cache)
    got = store.checkout("c", seq(50))
    assert got.cache is cache
    assert (got.cached_tokens, got.source, got.reason) == (40, "conversation", "")
    assert got.diverged_at is None
    assert got.tier == "memory"
    assert store.tier_of("c") == "none" and store.tokens_of("c") is None


def test_at_least_one_token_is_left_to_prefill():
    store = make_store()
    put(store, "c", seq(40))
    got = store.checkout("c", seq(40))
    assert got.cached_tokens == 39 and got.cache.tokens == seq(39)
    assert got.reason == "request ends at token 40 of 40" and got.diverged_at == 40


def test_divergence_trims_to_the_common_prefix():
    store = make_store()
    put(store, "c", seq(40))
    edited = seq(40)
    edited[25] = 999
    got = store.checkout("c", edited + [7])
    assert got.cached_tokens == 25 and got.cache.tokens == edited[:25]
    assert got.reason == "diverged at token 25 of 40" and got.diverged_at == 25
    assert got.source == "conversation"


def test_regenerate_drops_the_tail():
    store = make_store()
    put(store, "c", seq(40))
    got = store.checkout("c", seq(30) + [500, 501])
    assert got.cached_tokens == 30 and got.cache.tokens == seq(30)
    assert got.diverged_at == 30


def test_divergence_at_token_zero_gives_nothing():
    store = make_store()
    put(store, "c", seq(40))
    got = store.checkout("c", [77] + seq(10))
    assert got.cache is None and got.cached_tokens == 0 and got.source == "none"
    assert got.diverged_at == 0


def test_untrimmable_cache_is_reused_only_when_its_tokens_are_a_prefix():
    store = make_store()
    put(store, "c", seq(40), trimmable=False)
    got = store.checkout("c", seq(45))
    assert got.cached_tokens == 40 and got.source == "conversation"
    got.cache.extend(seq(5, 41))
    store.checkin("c", seq(45), got.cache)
    got = store.checkout("c", seq(30) + [9, 9])
    assert got.cache is None and got.cached_tokens == 0
    assert "cannot be trimmed" in got.reason and got.diverged_at == 30


def test_checkin_requires_the_cache_to_hold_exactly_the_tokens():
    store = make_store()
    with pytest.raises(ValueError):
        store.checkin("c", seq(10), FakeCache(seq(9)))
    assert store.tier_of("c") == "none"


def test_unknown_key_reason():
    store = make_store()
    got = store.checkout("nobody", seq(10))
    assert (got.cache, got.source, got.reason) == (None, "none", "not cached")


def test_delete():
    store = make_store()
    put(store, "c", seq(10))
    assert store.delete("c") is True
    assert store.delete("c") is False
    assert store.checkout("c", seq(11)).reason == "not cached"


# ------------------------------------------------------------------------------ shared prefix


def test_shared_prefix_is_copied_not_taken():
    store = make_store()
    system = seq(100)
    put(store, "a", system + [1000, 1001])
    got = store.checkout("b", system + [2000, 2001])
    assert got.source == "shared_prefix" and got.cached_tokens == 100
    assert got.cache.tokens == system
    assert got.reason == "not cached"  # b itself was not found
    assert store.tokens_of("a") == system + [1000, 1001]  # the source is untouched


def test_shared_prefix_needs_a_minimum_length():
    store = make_store(min_shared_prefix=16)
    put(store, "a", seq(15) + [1])
    assert store.checkout("b", seq(15) + [2]).source == "none"
    put(store, "a", seq(16) + [1])
    assert store.checkout("b", seq(16) + [2]).cached_tokens == 16


def test_shared_prefix_beats_a_worse_own_entry():
    store = make_store()
    put(store, "a", seq(60))
    put(store, "b", seq(5) + [0] * 30)
    got = store.checkout("b", seq(50) + [1])
    assert got.source == "shared_prefix" and got.cached_tokens == 50
    assert got.reason == "diverged at token 5 of 35" and got.diverged_at == 5
    assert store.tier_of("b") == "none"  # the old history is gone either way


def test_shared_prefix_of_untrimmable_cache_only_whole():
    store = make_store()
    put(store, "a", seq(40), trimmable=False)
    assert store.checkout("b", seq(30) + [0]).source == "none"
    got = store.checkout("b", seq(40) + [0])
    assert got.source == "shared_prefix" and got.cache.tokens == seq(40)


def test_one_shot_sequences_share_their_prefix_and_are_bounded():
    store = make_store(max_anonymous=2)
    system = seq(64)
    got = store.checkout(None, system + [1])
    assert got.source == "none"
    put(store, None, system + [1, 2])
    got = store.checkout(None, system + [3])
    assert got.source == "shared_prefix" and got.cached_tokens == 64
    for i in range(5):
        put(store, None, system + [10 + i])
    assert store.stats()["memory"]["entries"] == 2
    assert store.keys() == []


# ------------------------------------------------------------------------------ memory budget


def test_bytes_are_allocation_not_tokens():
    store = make_store()
    put(store, "c", seq(17))
    assert store.stats()["memory"]["bytes"] == 32 * BYTES_PER_TOKEN


def test_lru_eviction_drops_without_disk():
    one = alloc(20) * BYTES_PER_TOKEN
    store = make_store(max_bytes=2 * one)
    put(store, "a", seq(20))
    put(store, "b", seq(20, 100))
    got = store.checkout("a", seq(21))  # a becomes the most recent
    store.checkin("a", seq(20), got.cache)
    put(store, "c", seq(20, 200))
    assert store.tier_of("b") == "none" and store.tier_of("a") == "memory"
    assert store.stats()["memory"]["bytes"] <= 2 * one
    assert store.checkout("b", seq(20, 100)).reason == "evicted"


def test_tokens_of_does_not_change_lru_order():
    one = alloc(20) * BYTES_PER_TOKEN
    store = make_store(max_bytes=2 * one)
    put(store, "a", seq(20))
    put(store, "b", seq(20, 100))
    assert store.tokens_of("a") == seq(20)
    put(store, "c", seq(20, 200))
    assert store.tier_of("a") == "none" and store.tier_of("b") == "memory"


def test_oversized_entry_skips_memory(tmp_path):
    store = make_store(tmp_path, max_bytes=alloc(20) * BYTES_PER_TOKEN)
    put(store, "small", seq(20))
    put(store, "big", seq(100))
    assert store.tier_of("big") == "disk" and store.tier_of("small") == "memory"


def test_zero_budget_keeps_nothing_in_memory(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "c", seq(30))
    assert store.tier_of("c") == "disk" and store.stats()["memory"]["bytes"] == 0
    got = store.checkout("c", seq(31))
    assert got.source == "disk" and got.cache.tokens == seq(30)


def test_set_memory_budget_evicts_at_once(tmp_path):
    store = make_store(tmp_path)
    put(store, "a", seq(20))
    put(store, "b", seq(20, 100))
    store.set_memory_budget(alloc(20) * BYTES_PER_TOKEN)
    assert store.tier_of("a") == "disk" and store.tier_of("b") == "memory"


# ------------------------------------------------------------------------------ disk tier


def test_spill_restore_and_file_naming(tmp_path):
    one = alloc(20) * BYTES_PER_TOKEN
    store = make_store(tmp_path, max_bytes=one)
    put(store, "conv/secret name", seq(20))
    put(store, "b", seq(20, 100))
    assert store.tier_of("conv/secret name") == "disk"
    assert disk_files(tmp_path) == [file_for(tmp_path, "conv/secret name").name]
    got = store.checkout("conv/secret name", seq(25))
    assert (got.source, got.tier, got.cached_tokens) == ("disk", "disk", 20)
    assert got.cache.tokens == seq(20)
    assert disk_files(tmp_path) == []  # handed over: one owner
    assert store.stats()["disk"]["hits"] == 1


def test_checkin_replaces_a_stale_disk_copy(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "c", seq(20))
    store.set_memory_budget(10**9)
    put(store, "c", seq(30))
    assert store.tier_of("c") == "memory" and disk_files(tmp_path) == []


def test_restart_after_flush_and_after_crash(tmp_path):
    store = make_store(tmp_path)
    put(store, "kept", seq(30))
    assert store.flush() == 1
    put(store, "lost", seq(30, 100))  # only in memory when the process dies
    ops = FakeOps()
    store = make_store(tmp_path, ops=ops)
    assert ops.loads == 0  # the index is built from metadata only
    assert store.tier_of("kept") == "disk" and store.tokens_of("kept") == seq(30)
    assert store.tier_of("lost") == "none"
    got = store.checkout("kept", seq(31))
    assert got.source == "disk" and got.cache.tokens == seq(30)


def test_shared_prefix_from_disk_keeps_the_file(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "a", seq(50))
    got = store.checkout("b", seq(40) + [0])
    assert got.source == "shared_prefix" and got.tier == "disk"
    assert got.cache.tokens == seq(40)
    assert store.tier_of("a") == "disk"


def test_other_fingerprint_is_removed_with_one_line_each(tmp_path, caplog):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "a", seq(20))
    put(store, "b", seq(20))
    with caplog.at_level(logging.INFO, logger="mlxkvd.store"):
        store = make_store(tmp_path, fp="model-b")
    lines = [r for r in caplog.records if "another model" in r.getMessage()]
    assert len(lines) == 2
    assert disk_files(tmp_path) == []
    assert store.checkout("a", seq(21)).reason == "stored with another model"


def test_corrupt_and_truncated_files_are_removed_at_startup(tmp_path, caplog):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "good", seq(20))
    put(store, "trunc", seq(20, 100))
    put(store, "junk", seq(20, 200))
    path = file_for(tmp_path, "trunc")
    path.write_bytes(path.read_bytes()[:30])
    file_for(tmp_path, "junk").write_bytes(b"\x00\xff" * 10)
    (tmp_path / ".tmp-123-abc.json").write_text("partial")
    with caplog.at_level(logging.WARNING, logger="mlxkvd.store"):
        store = make_store(tmp_path)
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 2
    assert disk_files(tmp_path) == [file_for(tmp_path, "good").name]
    assert store.tier_of("trunc") == "none" and store.tier_of("good") == "disk"


def test_tampered_index_metadata_is_removed_at_startup(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "c", seq(40))
    path = file_for(tmp_path, "c")
    data = json.loads(path.read_text())
    data["metadata"]["tokens"] = json.dumps(seq(40, 2))  # valid, but not what was written
    path.write_text(json.dumps(data))
    store = make_store(tmp_path)
    assert store.tokens_of("c") is None and not path.exists()


def test_file_larger_than_the_disk_budget_does_not_push_others_out(tmp_path):
    store = make_store(tmp_path, max_bytes=0, max_disk_bytes=10**9)
    put(store, "probe", seq(20))
    size = file_for(tmp_path, "probe").stat().st_size
    store.delete("probe")
    store = make_store(tmp_path, max_bytes=0, max_disk_bytes=size + 10)
    put(store, "small", seq(20))
    put(store, "big", seq(200))
    assert store.tier_of("small") == "disk" and store.tier_of("big") == "none"
    assert disk_files(tmp_path) == [file_for(tmp_path, "small").name]


def test_checksum_mismatch_at_load_is_a_miss_never_a_wrong_cache(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "c", seq(40))
    path = file_for(tmp_path, "c")
    data = json.loads(path.read_text())
    data["tokens"][10] = 999  # arrays altered, metadata intact
    path.write_text(json.dumps(data))
    got = store.checkout("c", seq(41))
    assert got.cache is None and got.source == "none"
    assert got.reason == "cache file was corrupt"
    assert not path.exists()


def test_corrupt_shared_candidate_falls_back_to_the_next(tmp_path):
    store = make_store(tmp_path, max_bytes=0)
    put(store, "long", seq(60))
    put(store, "short", seq(30))
    path = file_for(tmp_path, "long")
    data = json.loads(path.read_text())
    data["checksum"] = "0" * 64
    path.write_text(json.dumps(data))
    got = store.checkout("new", seq(60) + [1])
    assert got.source == "shared_prefix" and got.cache.tokens == seq(30)


def test_disk_budget_deletes_least_recently_used_files(tmp_path):
    store = make_store(tmp_path, max_bytes=0, max_disk_bytes=10**9)
    put(store, "probe", seq(20))
    size = file_for(tmp_path, "probe").stat().st_size
    store.delete("probe")
    store = make_store(tmp_path, max_bytes=0, max_disk_bytes=2 * size + size // 2)
    for key in ["a", "b", "c"]:
        put(store, key, seq(20))
    assert [store.tier_of(k) for k in "abc"] == ["none", "disk", "disk"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 2 * size + size // 2
    assert store.checkout("a", seq(21)).reason == "evicted"


def test_disk_write_failure_is_logged_once_and_never_raised(tmp_path, caplog):
    ops = FakeOps()
    ops.fail_save = OSError(errno.ENOSPC, "No space left on device")
    store = make_store(tmp_path, ops=ops, max_bytes=alloc(20) * BYTES_PER_TOKEN)
    with caplog.at_level(logging.WARNING, logger="mlxkvd.store"):
        for i in range(4):
            put(store, f"k{i}", seq(20))  # each checkin evicts the previous one
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1
    assert disk_files(tmp_path) == []  # the partial temp file was removed
    assert store.tier_of("k3") == "memory" and store.tier_of("k0") == "none"
    assert store.checkout("k0", seq(21)).reason == "evicted"


def test_unusable_disk_dir_disables_the_tier(tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.WARNING, logger="mlxkvd.store"):
        store = make_store(not_a_dir, max_bytes=0)
    assert any("disabled" in r.getMessage() for r in caplog.records)
    put(store, "c", seq(20))
    assert store.tier_of("c") == "none" and store.stats()["disk"]["enabled"] is False


def test_clear_drops_memory_only(tmp_path):
    store = make_store(tmp_path, max_bytes=alloc(20) * BYTES_PER_TOKEN)
    put(store, "old", seq(20))
    put(store, "new", seq(20, 100))
    store.clear()
    assert store.tier_of("new") == "none" and store.tier_of("old") == "disk"
    assert store.checkout("new", seq(21, 100)).reason == "stored with another model"


def test_ttl_expires_both_tiers(tmp_path):
    clock = FakeClock()
    store = make_store(tmp_path, max_bytes=alloc(20) * BYTES_PER_TOKEN, ttl_s=60, clock=clock)
    put(store, "a", seq(20))
    put(store, "b", seq(20, 100))  # a spills to disk
    clock.now += 30
    put(store, "c", seq(20, 200))  # b spills to disk
    clock.now += 40  # a and b: 70 s unused; c: 40 s
    assert store.expire() == 2
    assert [store.tier_of(k) for k in "abc"] == ["none", "none", "memory"]
    assert disk_files(tmp_path) == []
    assert store.checkout("a", seq(21)).reason == "expired"


def test_stats_count_hits_misses_and_tokens_saved(tmp_path):
    store = make_store(tmp_path, max_bytes=alloc(20) * BYTES_PER_TOKEN)
    put(store, "a", seq(20))
    put(store, "b", seq(20, 100))  # a on disk
    store.checkout("b", seq(21, 100))  # memory hit, 20
    store.checkout("a", seq(21))  # disk hit, 20
    store.checkout("x", [5] * 30)  # miss everywhere
    s = store.stats()
    assert (s["memory"]["hits"], s["memory"]["misses"]) == (1, 2)
    assert (s["disk"]["hits"], s["disk"]["misses"]) == (1, 1)
    assert s["tokens_saved"] == 40


# ------------------------------------------------------------------------------ stateful


class StoreMachine(RuleBasedStateMachine):
    """Random conversations against a reference: what each key should hold, if anything."""

    def __init__(self):
        super().__init__()
        self.ops = FakeOps()
        self.dir = None
        self.ref: dict[str, list[int]] = {}  # what the client's last turn checked in
        self.corrupted: set[str] = set()  # keys whose file we damaged (may be lost)
        self.counter = 0

    @initialize(
        data=st.data(),
        max_tokens_in_memory=st.sampled_from([0, 32, 64, 160, 10**6]),
        disk=st.sampled_from(["none", "small", "unbounded"]),
    )
    def setup(self, data, max_tokens_in_memory, disk):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name) if disk != "none" else None
        self.max_bytes = max_tokens_in_memory * BYTES_PER_TOKEN
        self.max_disk = {"none": 0, "small": 3000, "unbounded": 10**9}[disk]
        self.unbounded_disk = disk == "unbounded"
        self.rng = random.Random(data.draw(st.integers(0, 2**32)))
        self.systems = [[self.rng.randrange(50) for _ in range(20)] for _ in range(2)]
        self.store = self._new_store()

    def teardown(self):
        if self.dir is not None:
            self.tmp.cleanup()

    def _new_store(self):
        return CacheStore(
            self.ops,
            fingerprint=FP,
            max_bytes=self.max_bytes,
            disk_dir=self.dir,
            max_disk_bytes=self.max_disk,
            min_shared_prefix=8,
        )

    def _may_be_lost(self, key):
        return not self.unbounded_disk or key in self.corrupted

    def _turn(self, key, tokens):
        """One engine turn: checkout, check the handover, prefill the rest, generate, checkin."""
        before = self.store.tier_of(key)
        stored = self.store.tokens_of(key)
        others = [self.store.tokens_of(k) for k in self.ref if k != key]
        got = self.store.checkout(key, tokens)
        assert 0 <= got.cached_tokens <= len(tokens) - 1
        cache = got.cache if got.cache is not None else FakeCache()
        assert cache.tokens == tokens[: got.cached_tokens]
        if got.cache is None:
            assert got.cached_tokens == 0 and got.source == "none"
        if before != "none" and key not in self.corrupted:
            own = min(common_prefix_length(stored, tokens), len(tokens) - 1)
            assert got.cached_tokens >= own
        clean = [o for k, o in zip([k for k in self.ref if k != key], others)
                 if o is not None and k not in self.corrupted]
        best = max((min(common_prefix_length(o, tokens), len(tokens) - 1) for o in clean),
                   default=0)
        if best >= 8:
            assert got.cached_tokens >= best
        full = tokens + [self.rng.randrange(50) for _ in range(self.rng.randrange(1, 6))]
        cache.extend(full[len(cache.tokens):])
        self.store.checkin(key, full, cache)
        self.ref[key] = full
        self.corrupted.discard(key)

    @rule(n=st.integers(1, 30), shared=st.booleans())
    def new_conversation(self, n, shared):
        self.counter += 1
        key = f"c{self.counter}"
        head = self.rng.choice(self.systems) if shared else []
        self._turn(key, head + [self.rng.randrange(50) for _ in range(n)])

    @precondition(lambda self: self.ref)
    @rule(n=st.integers(1, 30))
    def append(self, n):
        key = self.rng.choice(sorted(self.ref))
        self._turn(key, self.ref[key] + [self.rng.randrange(50) for _ in range(n)])

    @precondition(lambda self: self.ref)
    @rule()
    def edit(self):
        key = self.rng.choice(sorted(self.ref))
        tokens = list(self.ref[key])
        tokens[self.rng.randrange(len(tokens))] = 50 + self.rng.randrange(50)
        self._turn(key, tokens + [1])

    @precondition(lambda self: self.ref)
    @rule()
    def regenerate(self):
        key = self.rng.choice(sorted(self.ref))
        tokens = self.ref[key]
        self._turn(key, tokens[: self.rng.randrange(1, len(tokens) + 1)])

    @precondition(lambda self: self.ref)
    @rule()
    def delete(self):
        key = self.rng.choice(sorted(self.ref))
        had = self.store.tier_of(key) != "none"
        assert self.store.delete(key) == had
        del self.ref[key]
        assert self.store.tier_of(key) == "none"

    @rule(n=st.integers(1, 30))
    def one_shot(self, n):
        tokens = self.rng.choice(self.systems) + [self.rng.randrange(50) for _ in range(n)]
        got = self.store.checkout(None, tokens)
        cache = got.cache if got.cache is not None else FakeCache()
        assert cache.tokens == tokens[: got.cached_tokens]
        assert got.cached_tokens <= len(tokens) - 1
        cache.extend(tokens[len(cache.tokens):])
        self.store.checkin(None, tokens, cache)

    @rule(tokens=st.sampled_from([0, 32, 64, 160]))
    def evict(self, tokens):
        self.max_bytes = tokens * BYTES_PER_TOKEN
        self.store.set_memory_budget(self.max_bytes)

    @rule(graceful=st.booleans())
    def restart(self, graceful):
        tiers = {k: self.store.tier_of(k) for k in self.ref}
        if graceful:
            self.store.flush()
        self.store = self._new_store()
        for key, tier in tiers.items():
            if tier == "disk" or (graceful and tier == "memory" and self.dir is not None):
                if not self._may_be_lost(key):
                    assert self.store.tier_of(key) == "disk"
            else:
                assert self.store.tier_of(key) == "none"
                self.ref.pop(key)  # the client resyncs with a full history next time

    @precondition(lambda self: self.dir is not None)
    @rule(truncate=st.booleans())
    def corrupt_a_file(self, truncate):
        on_disk = [k for k in self.ref if self.store.tier_of(k) == "disk"]
        if not on_disk:
            return
        key = self.rng.choice(sorted(on_disk))
        path = file_for(self.dir, key)
        raw = bytearray(path.read_bytes())
        if truncate:
            raw = raw[: self.rng.randrange(len(raw))]
        else:
            i = self.rng.randrange(len(raw))
            raw[i] ^= 1 << self.rng.randrange(8)
        path.write_bytes(bytes(raw))
        self.corrupted.add(key)

    @invariant()
    def budgets_hold(self):
        if not hasattr(self, "store"):
            return
        s = self.store.stats()
        assert s["memory"]["bytes"] <= self.max_bytes
        assert s["disk"]["bytes"] <= self.max_disk
        if self.dir is not None:
            files = list(self.dir.iterdir())
            assert not [p for p in files if p.name.startswith(".tmp-")]
            on_disk = sum(p.stat().st_size for p in files)
            if self.corrupted:  # a truncated file is smaller than the index says
                assert on_disk <= s["disk"]["bytes"]
            else:
                assert on_disk == s["disk"]["bytes"]

    @invariant()
    def histories_are_kept(self):
        if not hasattr(self, "store"):
            return
        for key, tokens in self.ref.items():
            held = self.store.tokens_of(key)
            assert held is None or held == tokens
            if held is None:
                assert self._may_be_lost(key)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
