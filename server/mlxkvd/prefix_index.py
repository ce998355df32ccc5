"""The cache store's index: which stored token sequences share the longest prefix with a
request, found without scanning them, and where each key's entry lives.

- ``PrefixIndex``: token sequences by key, searchable by longest common prefix.
- ``EntryIndex``: the store's entries (one tier each per key) over a ``PrefixIndex`` kept in step
  lazily; its ``get`` is the O(1) read that status handlers make from other threads.
- ``plan_reuse``: how much of a stored sequence a request can reuse (the rule for caches that
  cannot be trimmed included), which the store applies to every entry it hands out.

Sequences are cut into blocks of ``block`` tokens. The chain hash of a sequence's first d blocks
(depth d) covers them all: ``chain[d] = chain_hash(chain[d-1], tokens[(d-1)*B : d*B])``, with
``chain[0]`` a constant for the empty prefix. A dict maps each chain hash to the keys whose
sequence has it, so two sequences found under the same chain hash at depth d share their first
``d*B`` tokens. A match at depth d implies a match at every shallower depth, hence the deepest
depth at which a request matches anything is found by a galloping then binary search over
depths, and the request's chain hashes are computed only up to about twice that depth. Within a
block, lengths come from comparing the tokens themselves (at C speed).

This is mlx-lm's ``PromptTrie`` idea with one node per block instead of one per token: a 32K-token
sequence is 2K dict entries, not 32K nested dicts.

Costs, with n the tokens of a request or sequence and B the block size:

- ``add`` of a key already indexed compares the old and new sequences (C speed) and hashes only
  the blocks after their common prefix: extending a conversation by t tokens costs O(t) hashing.
- ``remove`` costs O(n / B) dict updates.
- ``matches`` costs O(depth) hashing plus O(log depth) dict look-ups to find the deepest match,
  then one comparison of at most B tokens per key found at that depth; shallower depths are
  visited only if the caller asks for more.

Entries added ``whole_only`` (caches that cannot be trimmed) are reusable only when their whole
sequence is a prefix of the request; they live in maps of their own, keyed also by the chain
hash of their last full block, so that diverged ones never need to be looked at.

Block size: depth 0 holds every key, so no shared prefix is ever missed; but a prefix shorter
than one block is found only by visiting depth 0, a scan of every key. Callers looking for
prefixes of at least m tokens should use a block of at most m tokens (``CacheStore`` uses
``min(16, min_shared_prefix)``), so that every prefix they want lies at depth 1 or deeper.

Trust: whole blocks are matched by hash (64 bits); a collision would only make a reported length
wrong, so a caller that must be exact (the cache store) compares the tokens of the entry it
actually uses.

Not thread-safe (but ``EntryIndex.get``); do not add or remove while iterating ``matches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

DEFAULT_BLOCK = 16
_ROOT = 0  # chain hash of the empty prefix
_LATER = (-1, [])  # a stream's next group, to be read when asked for


def chain_hash(prev: int, block: tuple[int, ...]) -> int:
    """The chain hash of a block following a prefix whose chain hash is ``prev``."""
    return hash((prev, block))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences, at C speed."""
    return common_prefix(tuple(a), tuple(b), 256)


def common_prefix(a, b, block: int) -> int:
    """Length of the longest common prefix of two tuples or strings, compared a slice of
    ``block`` items at a time."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (a conversation grew): one comparison
        return n
    lo = 0
    while lo < n:
        hi = min(lo + block, n)
        if a[lo:hi] != b[lo:hi]:
            while a[lo] == b[lo]:
                lo += 1
            return lo
        lo = hi
    return n


@dataclass
class Reuse:
    """How much of a stored sequence a request can reuse (see ``plan_reuse``)."""

    reusable: int
    reason: str = ""  # why less than all of the stored sequence
    diverged_at: int | None = None  # first index where stored and requested differ
    needs_trim: bool = False


def plan_reuse(stored: Sequence[int], tokens: Sequence[int], trimmable: bool) -> Reuse:
    """The longest prefix of ``stored`` a cache can give to ``tokens``, leaving at least one token
    to prefill. A cache that cannot be trimmed gives all of ``stored`` or nothing."""
    lcp = common_prefix_length(stored, tokens)
    reusable = min(lcp, len(tokens) - 1)
    if reusable == len(stored):
        return Reuse(reusable)
    if lcp < min(len(stored), len(tokens)):
        reason = f"diverged at token {lcp} of {len(stored)}"
    else:  # the request is a prefix of what is stored (regenerate), or equal to it
        reason = f"request ends at token {len(tokens)} of {len(stored)}"
    if not trimmable:
        return Reuse(0, reason + "; cache cannot be trimmed", lcp)
    return Reuse(reusable, reason, lcp, needs_trim=True)


class Candidate(NamedTuple):
    """An entry that could give the first ``reusable`` tokens of a request."""

    key: str
    tier: str  # "memory" | "disk"
    reusable: int


@dataclass
class _Indexed:
    tokens: tuple[int, ...]
    chain: list[int]  # chain[d]: chain hash of the first d blocks; chain[0] is _ROOT
    whole_only: bool


class _RequestChain:
    """A request's chain hashes, computed on demand, each once."""

    def __init__(self, tokens: tuple[int, ...], block: int):
        self._tokens = tokens
        self._block = block
        self._hashes = [_ROOT]

    def __getitem__(self, depth: int) -> int:
        hashes, b = self._hashes, self._block
        while len(hashes) <= depth:
            d = len(hashes) - 1
            hashes.append(chain_hash(hashes[-1], self._tokens[d * b : (d + 1) * b]))
        return hashes[depth]


class PrefixIndex:
    """Token sequences by key, searchable by longest common prefix with a request."""

    def __init__(self, block: int = DEFAULT_BLOCK):
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.block = block
        self._seqs: dict[str, _Indexed] = {}
        # chain hash -> the key(s) whose sequence has it (see _put):
        self._partial: dict[int, str | set[str]] = {}  # keys usable in part
        self._whole: dict[int, str | set[str]] = {}  # keys usable only whole
        self._ends: dict[int, str | set[str]] = {}  # by a whole-only key's last full block

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, key: str) -> bool:
        return key in self._seqs

    def tokens_of(self, key: str) -> tuple[int, ...] | None:
        rec = self._seqs.get(key)
        return rec.tokens if rec is not None else None

    def add(self, key: str, tokens: Sequence[int], *, whole_only: bool = False) -> None:
        """Index ``tokens`` under ``key``, replacing its previous sequence. Only the blocks after
        the common prefix with the previous sequence are hashed. ``whole_only``: the entry can
        be reused only whole (see ``matches``)."""
        tokens = tuple(tokens)
        b = self.block
        rec = self._seqs.get(key)
        if rec is not None and rec.whole_only != whole_only:
            self.remove(key)
            rec = None
        chains = self._whole if whole_only else self._partial
        if rec is None:
            rec = self._seqs[key] = _Indexed(tokens, [_ROOT], whole_only)
            _put(chains, _ROOT, key)
        else:
            chain = rec.chain
            if whole_only:
                _discard(self._ends, chain[-1], key)
            keep = min(common_prefix_length(rec.tokens, tokens) // b, len(chain) - 1)
            for h in chain[keep + 1 :]:
                _discard(chains, h, key)
            del chain[keep + 1 :]
            rec.tokens = tokens
        chain = rec.chain
        for d in range(len(chain) - 1, len(tokens) // b):
            h = chain_hash(chain[-1], tokens[d * b : (d + 1) * b])
            chain.append(h)
            _put(chains, h, key)
        if whole_only:
            _put(self._ends, chain[-1], key)

    def remove(self, key: str) -> bool:
        """Forget ``key``. True if it was indexed."""
        rec = self._seqs.pop(key, None)
        if rec is None:
            return False
        chains = self._whole if rec.whole_only else self._partial
        for h in rec.chain:
            _discard(chains, h, key)
        if rec.whole_only:
            _discard(self._ends, rec.chain[-1], key)
        return True

    def matches(
        self, tokens: Sequence[int], *, longer_than: int = -1, at_most: int | None = None
    ) -> Iterator[tuple[int, list[str]]]:
        """``(length, keys)``: the keys whose sequence shares ``length`` > ``longer_than``
        leading tokens with ``tokens``, longest first, each length once; a longer shared prefix
        counts as ``at_most`` tokens. A whole-only key is included only when its whole sequence,
        of at most ``at_most`` tokens, is a prefix of ``tokens`` (``length`` is then its length).
        Lazy: a shallower depth is visited only when the caller asks for more."""
        tokens = tuple(tokens)
        cap = len(tokens) if at_most is None else at_most
        if cap <= longer_than:
            return
        chain = _RequestChain(tokens, self.block)
        streams = [
            self._partial_matches(tokens, chain, longer_than),
            self._whole_matches(tokens, chain, longer_than, cap),
        ]
        heads = [next(s, None) for s in streams]
        while True:
            live = [min(h[0], cap) for h in heads if h is not None]
            if not live:
                return
            top = max(live)
            keys: list[str] = []
            for i, stream in enumerate(streams):
                head = heads[i]
                if head is None or min(head[0], cap) != top:
                    continue
                keys += head[1]
                heads[i] = _LATER
                while top == cap:  # every length beyond the cap is the cap: take them all now
                    head = heads[i] = next(stream, None)
                    if head is None or min(head[0], cap) != top:
                        break
                    keys += head[1]
            yield top, keys
            # Only now, when the caller wants more: the next depth of the streams just used.
            heads = [next(s, None) if h is _LATER else h for s, h in zip(streams, heads)]

    # ------------------------------------------------------------------------------ internals

    def _deepest(self, chains: dict, chain: _RequestChain, most: int) -> int:
        """The deepest depth (at most ``most``) at which ``chains`` holds the request's chain
        hash, or -1 if ``chains`` is empty. Galloping, then binary search: the request's hashes
        are computed up to at most about twice the answer."""
        if _ROOT not in chains:
            return -1
        lo, probe = 0, 1
        while probe <= most and chain[probe] in chains:
            lo, probe = probe, probe * 2
        hi = min(probe, most + 1)  # the shallowest depth known not to match
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if chain[mid] in chains:
                lo = mid
            else:
                hi = mid
        return lo

    def _partial_matches(self, tokens, chain, longer_than) -> Iterator[tuple[int, list[str]]]:
        # A key first met at depth d (not at d+1) shares d*B to d*B+B-1 tokens with the request:
        # every key met at a deeper depth shares more than every key met later.
        b = self.block
        depth = self._deepest(self._partial, chain, len(tokens) // b)
        seen: set[str] = set()
        while depth >= 0 and depth * b + b - 1 > longer_than:
            start = depth * b
            found: dict[int, list[str]] = {}
            head = tokens[start : start + b]
            for key in _members(self._partial, chain[depth]):
                if key in seen:
                    continue
                seen.add(key)
                stored = self._seqs[key].tokens
                length = start + common_prefix_length(stored[start : start + b], head)
                if length > longer_than:
                    found.setdefault(length, []).append(key)
            for length in sorted(found, reverse=True):
                yield length, found[length]
            depth -= 1

    def _whole_matches(self, tokens, chain, longer_than, cap) -> Iterator[tuple[int, list[str]]]:
        # A whole-only key ending in block d is a prefix of the request iff its chain hash at
        # depth d is the request's and its tail (fewer than B tokens) matches.
        b = self.block
        depth = self._deepest(self._whole, chain, len(tokens) // b)
        while depth >= 0 and depth * b + b - 1 > longer_than:
            start = depth * b
            found: dict[int, list[str]] = {}
            for key in _members(self._ends, chain[depth]):
                stored = self._seqs[key].tokens
                n = len(stored)
                if (
                    longer_than < n <= cap
                    and start <= n < start + b
                    and stored[start:] == tokens[start:n]
                ):
                    found.setdefault(n, []).append(key)
            for length in sorted(found, reverse=True):
                yield length, found[length]
            depth -= 1


class EntryIndex:
    """The store's entries by key, and by prefix: where each key's entry is seen, and which
    entries give the most of a request.

    An entry is one tier's (``tokens``, ``trimmable``, ``nbytes``, ``last_used``); a key in both
    tiers is seen in one (the store records the resident entry). ``get`` is one read of a plain
    dict whose values are never changed in place: O(1) and safe from any thread. The prefix
    index follows that dict lazily: a change costs O(1) when it is made, and its tokens are
    indexed by the next search that does not exclude the key, so that a conversation checked
    out and checked in again during its turn is indexed once, for what the turn added.
    """

    def __init__(self, block: int = DEFAULT_BLOCK):
        self._where: dict[str, tuple[str, Any]] = {}
        self._prefixes = PrefixIndex(block)
        self._stale: set[str] = set()  # keys changed since they were indexed

    def get(self, key: str) -> tuple[str, Any] | None:
        """``(tier, entry)`` or None. O(1), any thread."""
        return self._where.get(key)

    def set(self, key: str, tier: str, entry) -> None:
        self._where[key] = (tier, entry)
        self._stale.add(key)

    def discard(self, key: str) -> None:
        self._where.pop(key, None)
        self._stale.add(key)

    def refresh(self, exclude=()) -> None:
        """Index the changes not indexed yet, except those of ``exclude``."""
        for key in [k for k in self._stale if k not in exclude]:
            self._stale.discard(key)
            where = self._where.get(key)
            if where is None:
                self._prefixes.remove(key)
            else:
                self._prefixes.add(key, where[1].tokens, whole_only=not where[1].trimmable)

    def candidate(self, key: str, tokens: Sequence[int], *, better_than: int) -> Candidate | None:
        """What ``key``'s entry gives of ``tokens``, if more than ``better_than`` tokens."""
        where = self._where.get(key)
        if where is None or len(where[1].tokens) <= better_than:  # no need to compare
            return None
        reusable = plan_reuse(where[1].tokens, tokens, where[1].trimmable).reusable
        return Candidate(key, where[0], reusable) if reusable > better_than else None

    def longest(
        self, tokens: Sequence[int], *, better_than: int, exclude=(), first: Candidate | None = None
    ) -> Iterator[Candidate]:
        """Entries other than ``exclude`` that give more than ``better_than`` of ``tokens``
        (at most all but the last token, left to prefill; an entry that cannot be trimmed only
        whole), best first: most tokens, then ``first`` (found by key, preferred at equal
        length), memory before disk (no file to read), the most recently used. Lazy.
        ``reusable`` trusts block hashes: check it before use."""
        for cand in self._longest(tokens, better_than, exclude):
            if first is not None and cand.reusable <= first.reusable:
                yield first
                first = None
            yield cand
        if first is not None:
            yield first

    def _longest(self, tokens, better_than, exclude) -> Iterator[Candidate]:
        self.refresh(exclude)
        groups = self._prefixes.matches(tokens, longer_than=better_than, at_most=len(tokens) - 1)
        for reusable, keys in groups:
            found = [(k, w) for k in keys if k not in exclude and (w := self._where.get(k))]
            found.sort(key=lambda f: (f[1][0] != "memory", -f[1][1].last_used))
            for key, (tier, _) in found:
                yield Candidate(key, tier, reusable)


# A chain hash maps to one key (a str) or to a set of two or more: most blocks of a long
# conversation are its own, and a set per block would triple the index's memory.
def _put(table: dict[int, str | set[str]], h: int, key: str) -> None:
    keys = table.get(h)
    if keys is None:
        table[h] = key
    elif isinstance(keys, set):
        keys.add(key)
    elif keys != key:
        table[h] = {keys, key}


def _discard(table: dict[int, str | set[str]], h: int, key: str) -> None:
    keys = table.get(h)
    if keys == key:
        del table[h]
    elif isinstance(keys, set) and key in keys:
        keys.discard(key)
        if len(keys) == 1:
            table[h] = keys.pop()


def _members(table: dict[int, str | set[str]], h: int) -> tuple[str, ...] | set[str]:
    keys = table.get(h)
    if keys is None:
        return ()
    return (keys,) if isinstance(keys, str) else keys
