"""The disk tier on its own: what it reports when it drops an entry, and its reads. The rules it
shares with the store (naming, atomic writes, integrity, budgets) are tested in test_store.py."""

from __future__ import annotations

import json

from test_store import FP, FakeCache, FakeClock, FakeOps, file_for, seq

from mlxkvd.disk_tier import DiskTier


def make_tier(tmp_path, *, ops=None, max_bytes=10**9, fp=FP):
    dropped: list[tuple[str, str]] = []
    tier = DiskTier(ops or FakeOps(), tmp_path, fingerprint=fp, max_bytes=max_bytes,
                    clock=FakeClock(), on_drop=lambda key, why: dropped.append((key, why)))
    return tier, dropped


def write(tier, key, tokens):
    return tier.write(key, tokens, FakeCache(tokens), last_used=0.0)


def test_every_entry_it_drops_by_itself_is_reported(tmp_path):
    tier, dropped = make_tier(tmp_path)
    assert write(tier, "a", seq(20)) and write(tier, "b", seq(20, 100))
    size = tier.peek("a").nbytes
    tier.max_bytes = size + size // 2
    assert write(tier, "c", seq(20, 200))  # pushes the least recently used two out
    assert dropped == [("a", "evicted"), ("b", "evicted")] and list(tier.keys()) == ["c"]
    path = file_for(tmp_path, "c")
    data = json.loads(path.read_text())
    data["tokens"][0] = 999
    path.write_text(json.dumps(data))
    assert tier.load("c", 20) is None and "c" not in tier
    assert dropped[-1] == ("c", "cache file was corrupt")
    assert write(tier, "d", seq(20))
    other, dropped = make_tier(tmp_path, fp="model-b")
    assert dropped == [] and "d" not in other and other.nbytes == tier.nbytes  # kept, not served
    again, _ = make_tier(tmp_path)
    assert "d" in again and again.load("d", 20) is not None


def test_other_models_files_count_against_the_budget_in_lru_order(tmp_path):
    tier, _ = make_tier(tmp_path, fp="model-b")
    assert write(tier, "old", seq(20))
    size = tier.peek("old").nbytes
    tier, dropped = make_tier(tmp_path)  # model-a: keeps model-b's file, counts its bytes
    assert tier.nbytes == size and len(tier) == 0
    tier.max_bytes = size + size // 2
    # The other model's file is older: it goes first.
    assert tier.write("new", seq(20, 100), FakeCache(seq(20, 100)), last_used=tier._clock() + 1)
    assert dropped == [] and list(tier.keys()) == ["new"] and tier.nbytes == tier.peek("new").nbytes
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_removals_by_the_store_are_not_reported(tmp_path):
    tier, dropped = make_tier(tmp_path)
    write(tier, "a", seq(20))
    write(tier, "b", seq(20))
    assert tier.remove("a") and not tier.remove("a")
    assert tier.expire(deadline=1.0) == ["b"]
    assert dropped == [] and len(tier) == 0 and tier.nbytes == 0


def test_peek_leaves_the_order_and_load_cuts_to_what_is_asked(tmp_path):
    ops = FakeOps()
    tier, _ = make_tier(tmp_path, ops=ops)
    write(tier, "a", seq(100))
    write(tier, "b", seq(20))
    assert tier.peek("a").tokens == tuple(seq(100)) and tier.keys() == ["b", "a"]
    cache = tier.load("a", 30)  # most of the file cut away: a copy, not a trimmed allocation
    assert cache.tokens == seq(30) and cache.capacity == 32
    assert tier.keys() == ["a", "b"] and tier.peek("a").last_used == FakeClock()()
    assert tier.load("a", 80).tokens == seq(80)
    assert tier.load("missing", 1) is None and ops.loads == 2
