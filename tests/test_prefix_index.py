"""The prefix index against a brute-force scan, and what its operations cost (counted, not
timed): hash computations and token comparisons."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxkvd import prefix_index
from mlxkvd.prefix_index import PrefixIndex, common_prefix_length

KEYS = [f"k{i}" for i in range(6)]
TOKEN = st.integers(0, 3)  # a small alphabet: plenty of accidental shared prefixes


def brute_force(seqs: dict, whole: set, tokens, longer_than=-1, at_most=None):
    """What ``matches`` must answer, by comparing the request with every sequence."""
    cap = len(tokens) if at_most is None else at_most
    found: dict[int, set[str]] = {}
    for key, stored in seqs.items():
        length = common_prefix_length(stored, tokens)
        if key in whole:
            if length != len(stored) or length > cap:
                continue  # usable only whole
        length = min(length, cap)
        if length > longer_than:
            found.setdefault(length, set()).add(key)
    return sorted(found.items(), reverse=True)


def answer(index, tokens, longer_than=-1, at_most=None):
    got = list(index.matches(tokens, longer_than=longer_than, at_most=at_most))
    keys = [k for _, ks in got for k in ks]
    assert len(keys) == len(set(keys))  # each key once
    return [(length, set(keys)) for length, keys in got]


@st.composite
def sequences(draw, trunks):
    """A sequence that often shares a prefix with one of ``trunks``."""
    trunk = draw(st.sampled_from(trunks))
    return trunk[: draw(st.integers(0, len(trunk)))] + draw(st.lists(TOKEN, max_size=20))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), block=st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_longest_matches_equal_a_brute_force_scan(data, block):
    trunks = data.draw(st.lists(st.lists(TOKEN, max_size=48), min_size=1, max_size=3))
    index = PrefixIndex(block)
    seqs: dict[str, tuple[int, ...]] = {}
    whole: set[str] = set()
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["add", "add", "extend", "cut", "remove", "query"]))
        key = data.draw(st.sampled_from(KEYS))
        if op == "add":
            tokens = tuple(data.draw(sequences(trunks)))
            whole_only = data.draw(st.booleans())
            index.add(key, tokens, whole_only=whole_only)
            seqs[key] = tokens
            (whole.add if whole_only else whole.discard)(key)
        elif op in ("extend", "cut") and key in seqs:  # replace by a longer or shorter one
            old = seqs[key]
            if op == "extend":
                tokens = old + tuple(data.draw(st.lists(TOKEN, max_size=20)))
            else:
                tokens = old[: data.draw(st.integers(0, len(old)))]
            index.add(key, tokens, whole_only=key in whole)
            seqs[key] = tokens
        elif op == "remove":
            assert index.remove(key) == (key in seqs)
            seqs.pop(key, None)
            whole.discard(key)
        request = data.draw(sequences(trunks))
        if seqs and data.draw(st.booleans()):  # a stored sequence, cut or extended by a token
            stored = seqs[data.draw(st.sampled_from(sorted(seqs)))]
            request = list(stored[: len(stored) - data.draw(st.integers(0, 1))])
            request += data.draw(st.lists(TOKEN, max_size=1))
        longer_than = data.draw(st.integers(-1, 30))
        # The store's cap: all but the last token of the request (one is left to prefill).
        at_most = data.draw(st.sampled_from([None, max(len(request) - 1, 0)]))
        assert answer(index, request, longer_than, at_most) == brute_force(
            seqs, whole, request, longer_than, at_most)
        assert len(index) == len(seqs)
    # Replacing in place leaves exactly what indexing the final sequences from scratch does.
    fresh = PrefixIndex(block)
    for key, tokens in seqs.items():
        fresh.add(key, tokens, whole_only=key in whole)
    for table in ("_partial", "_whole", "_ends"):
        assert getattr(index, table) == getattr(fresh, table)
    for key in list(seqs):
        index.remove(key)
    assert not (index._seqs or index._partial or index._whole or index._ends)


def test_whole_only_entries_are_matched_only_whole():
    index = PrefixIndex(4)
    index.add("part", range(20))
    index.add("whole", range(10), whole_only=True)
    index.add("longer", range(30), whole_only=True)
    request = list(range(25)) + [99]
    assert answer(index, request) == [(20, {"part"}), (10, {"whole"})]
    assert answer(index, list(range(10))) == [(10, {"part", "whole"})]
    assert answer(index, list(range(5)) + [99]) == [(5, {"part"})]


@pytest.mark.parametrize("block", [1, 2, 4])
def test_lengths_beyond_the_cap_count_as_the_cap(block):
    index = PrefixIndex(block)
    index.add("all", [1, 2, 3, 4, 5])  # holds the whole request and more
    index.add("equal", [1, 2, 3, 4])  # the request itself
    index.add("one_less", [1, 2, 3, 9])  # diverges at the last token
    index.add("whole_equal", [1, 2, 3, 4], whole_only=True)  # would leave nothing to prefill
    index.add("whole_less", [1, 2, 3], whole_only=True)
    assert answer(index, [1, 2, 3, 4], at_most=3) == [
        (3, {"all", "equal", "one_less", "whole_less"})]
    assert answer(index, [1, 2, 3, 4], at_most=2) == [(2, {"all", "equal", "one_less"})]
    assert answer(index, [1, 2, 3, 4], longer_than=3, at_most=3) == []


@pytest.fixture
def hashes(monkeypatch):
    """Counts block hash computations."""
    calls = []
    real = prefix_index.chain_hash

    def counting(prev, block):
        calls.append(len(block))
        return real(prev, block)

    monkeypatch.setattr(prefix_index, "chain_hash", counting)
    return calls


def test_add_of_an_extended_sequence_hashes_only_the_new_blocks(hashes):
    index = PrefixIndex(16)
    history = list(range(10_000))
    index.add("c", history)
    assert len(hashes) == 10_000 // 16
    hashes.clear()
    history += list(range(50_000, 50_100))  # the next turn: 100 tokens
    index.add("c", history)
    assert len(hashes) == 10_100 // 16 - 10_000 // 16  # 7 blocks, not 631
    hashes.clear()
    index.add("c", history)  # the same sequence again: nothing to hash
    assert hashes == []
    edited = history[:5_000] + [7] * 10  # an edit rewinds to block 312 and no further
    index.add("c", edited)
    assert len(hashes) == len(edited) // 16 - 5_000 // 16
    assert answer(index, history) == [(5_000, {"c"})]


def test_lookup_hashes_the_request_only_about_as_deep_as_the_match(hashes):
    index = PrefixIndex(16)
    index.add("short", list(range(160)))  # 10 blocks
    hashes.clear()
    request = list(range(160)) + [-1] * 32_000  # 2,000 more blocks
    assert next(index.matches(request)) == (160, ["short"])
    assert len(hashes) <= 2 * 11  # galloping: at most about twice the matching depth


def test_lookup_compares_only_the_keys_at_the_deepest_match(monkeypatch):
    index = PrefixIndex(16)
    system = list(range(64))
    for i in range(200):  # share 4 blocks with the request, then differ
        index.add(f"other{i}", system + [1000 + i] * 40)
    index.add("fork", system + list(range(500, 600)))
    compared = []
    real = prefix_index.common_prefix_length
    monkeypatch.setattr(prefix_index, "common_prefix_length",
                        lambda a, b: compared.append(1) or real(a, b))
    matches = index.matches(system + list(range(500, 650)))
    assert next(matches) == (164, ["fork"])
    assert len(compared) == 1  # the 200 others, met only at a shallower depth, were not visited
    length, keys = next(matches)
    assert length == 64 and len(keys) == 200  # until the caller asks for more


def test_block_must_be_positive():
    with pytest.raises(ValueError):
        PrefixIndex(0)
