"""The cache store: token sequences -> KV caches, the lookup rules of a turn.

Pure bookkeeping. No gRPC, no threads, no model: it is called from the engine thread that owns
MLX, and everything that touches a cache object goes through an adapter (``ops``, see
``CacheOps``), so the rules here are tested with fake caches (tests/test_store.py). Where entries
live, a memory tier bounded by bytes over a disk tier, with write-behind, eviction and expiry, is
``tiers.Tiers`` (its own rules); shared prefixes are found through ``prefix_index.EntryIndex``.

Rules:

- One owner. ``checkout`` REMOVES a conversation's own entry from the memory tier and hands the
  cache object to the engine without copying; the engine ``checkin``s it after the turn.
- ``checkout`` looks for the key's own entry in memory, then on disk. An own entry that covers
  the request (all its tokens are a prefix of it) is the answer, and no other entry is searched
  for (only the key's checkpoint, found by its key, can still give more): a cached turn costs
  what it adds, however many entries are stored. Otherwise the key's checkpoint or the longest
  prefix shared with any other entry, found through the prefix index (copied, never handed
  over), is taken when it gives more. What is handed out is trimmed so that the cache holds
  exactly ``tokens[:cached_tokens]``, with at least one token left to prefill.
- The cache a turn has checked out counts against the memory budget: ``checkout(reserve_bytes=...)``
  makes room for what it will grow to, under a lease that ``checkin`` or ``release`` ends.
- Checkpoints. A cache that cannot be trimmed (sliding-window or recurrent layers) cannot be
  rewound to where a regenerated or rewritten turn diverges. The engine checks in, with it, a
  copy taken at the turn boundary (before the generation prompt); it is stored as an entry of its
  own, under a key derived from the conversation's, and ``checkout`` resumes from it (source
  ``checkpoint``) when the conversation's own cache does not fit the request.
- One-shot sequences (checked in with key None) are stored under anonymous keys, for prefix
  sharing only (the tiers keep them in memory only); they and checkpoints are not conversations
  (``keys``).
- Disk errors never escape ``checkin``/``checkout`` (see ``tiers``); a key that is not found is
  reported with why it left the store, when that is known.
- Threads. Only ``tier_of``, ``entry_info``, ``tokens_of`` and ``stats`` may be called from other
  threads (the gRPC status handlers) while the engine thread changes the store: each is O(1) and
  reads one plain dict entry or a few counters, never a structure being rebuilt. Everything
  else belongs to the engine thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import lru

from .disk_tier import CacheFileError
from .prefix_index import DEFAULT_BLOCK, Candidate, EntryIndex, common_prefix_length, plan_reuse
from .tiers import Tiers

__all__ = ["CacheFileError", "CacheOps", "CacheStore", "Lookup", "common_prefix_length"]

log = logging.getLogger(__name__)

# A shared prefix shorter than this is not worth a copy (and is mostly chat-template boilerplate).
DEFAULT_MIN_SHARED_PREFIX = 16
# One-shot (key None) sequences kept for prefix sharing, memory only.
DEFAULT_MAX_ANONYMOUS = 4
# How many forgotten keys we remember, to say *why* a known conversation was not found.
_GONE_CAPACITY = 4096
_ANON_PREFIX = "\x00anon:"
_CHECKPOINT_SUFFIX = "\x00checkpoint"


class CacheOps(Protocol):
    """What the store needs to know about cache objects. ``kvcache.MlxCacheOps`` is the real one."""

    file_suffix: str

    def nbytes(self, cache) -> int: ...  # allocated bytes, not tokens used
    def num_tokens(self, cache) -> int | None: ...  # None: the cache does not count them
    def can_trim(self, cache) -> bool: ...
    def trim(self, cache, n: int) -> None: ...  # drop the last n tokens, in place
    def copy_prefix(self, cache, n: int) -> Any: ...  # a new cache with the first n tokens
    def nbytes_with_room(self, cache, tokens: int) -> int: ...  # nbytes once room is made
    def make_room(self, cache, tokens: int) -> None: ...  # allocate room for more tokens
    def save(self, path: Path, cache, metadata: dict[str, str]) -> None: ...
    # A copy that ``save`` can write from another thread while the cache goes on changing;
    # None where there is none (that cache's writes then hold the caller).
    def snapshot(self, cache) -> Any | None: ...
    def load(self, path: Path) -> tuple[Any, dict[str, str]]: ...  # raises CacheFileError
    def read_metadata(self, path: Path) -> dict[str, str]: ...  # raises CacheFileError


@dataclass
class Lookup:
    """The result of ``CacheStore.checkout``."""

    cache: Any | None  # now owned by the caller; None = start from an empty cache
    cached_tokens: int  # the cache holds exactly the KV of tokens[:cached_tokens]
    source: str  # "none" | "conversation" | "shared_prefix" | "disk" | "checkpoint"
    reason: str = ""  # why less than the conversation's stored history was reused
    diverged_at: int | None = None  # first token index where stored and requested differ
    tier: str = "none"  # where the cache came from: "memory" | "disk" | "none"


class Lease:
    """A cache checked out for one turn (``CacheStore.lease``): what the lookup found, the
    bytes reserved for it, and the one way back, ``checkin`` or ``release``."""

    def __init__(self, store: "CacheStore", key: str | None, lookup: Lookup, lease: int):
        self.key = key
        self.lookup = lookup
        self._store = store
        self._lease = lease

    def reserve(self, nbytes: int) -> None:
        """The turn holds ``nbytes`` more (a checkpoint copy)."""
        self._store.reserve(nbytes, lease=self._lease)

    def checkin(self, tokens: Sequence[int], cache, *, checkpoint: tuple[Sequence[int], Any] | None = None) -> None:
        self._store.checkin(self.key, tokens, cache, checkpoint=checkpoint, lease=self._lease)

    def release(self) -> None:
        self._store.release(lease=self._lease)


class CacheStore:
    """Per-conversation KV caches in a memory tier and an optional disk tier.

    ``fingerprint`` names the model the caches were made with; disk files with another
    fingerprint are kept for that model (``reopen``) and never served. ``max_bytes`` bounds resident (allocated) bytes;
    0 keeps nothing in memory. ``max_disk_bytes`` bounds the disk tier (0 or no ``disk_dir``:
    no disk tier). ``ttl_s`` forgets entries unused for that long (see ``expire``).
    ``min_shared_prefix`` is the shortest prefix worth copying from another entry; it also sets
    the prefix index's block size (at most 16 tokens), so that no such prefix is missed.
    """

    def __init__(
        self,
        ops: CacheOps,
        *,
        fingerprint: str,
        max_bytes: int,
        disk_dir: Path | None = None,
        max_disk_bytes: int = 0,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_shared_prefix: int = DEFAULT_MIN_SHARED_PREFIX,
        max_anonymous: int = DEFAULT_MAX_ANONYMOUS,
    ):
        self._ops = ops
        self._min_shared_prefix = min_shared_prefix
        # What ``reopen`` passes on (kept current by the setters).
        self._settings = dict(max_bytes=max_bytes, disk_dir=disk_dir, max_disk_bytes=max_disk_bytes,
                              ttl_s=ttl_s, clock=clock, min_shared_prefix=min_shared_prefix,
                              max_anonymous=max_anonymous)
        self._next_lease = 1
        self._gone: lru.LRU = lru.LRU(_GONE_CAPACITY)  # key -> why it is no longer stored
        self._shared_hits = 0
        self._tokens_saved = 0
        # Where each key's entry is seen, and by prefix; the tiers keep it in step.
        self._entries = EntryIndex(max(1, min(DEFAULT_BLOCK, min_shared_prefix)))
        self._tiers = Tiers(ops, self._entries, fingerprint=fingerprint, max_bytes=max_bytes,
                            disk_dir=disk_dir, max_disk_bytes=max_disk_bytes, ttl_s=ttl_s,
                            clock=clock, max_anonymous=max_anonymous, on_drop=self._dropped)

    # ------------------------------------------------------------------------------- turns

    def checkout(self, key: str | None, tokens: Sequence[int], *, reserve_bytes: int = 0,
                 lease: int = 0) -> Lookup:
        """Hand the caller the best cache for ``tokens``; the caller owns it until ``checkin``
        (or ``release``).

        The key's own entry (memory, then disk) is removed from the store and handed over
        without a copy. If all its tokens are a prefix of ``tokens`` (the usual next turn), it
        is the answer: no other entry is looked at, except the key's own checkpoint if that is
        longer. Otherwise (the own entry diverged or was not found), if another entry shares a
        longer prefix with ``tokens``, of at least ``min_shared_prefix`` tokens, that prefix is
        copied instead and the own entry is dropped; the key's own checkpoint is such an entry,
        whatever its length. Always ``cached_tokens < len(tokens)``.

        ``reserve_bytes`` is what the handed-out cache may grow to during the turn: other
        entries are evicted (to disk) until it fits the memory budget beside them. It is held
        under ``lease`` (``new_lease()``; several caches may be out at once, each under its
        own) until ``checkin`` or ``release`` of that lease.
        """
        tokens = tuple(tokens)
        self._expire_if_due()
        own = self._take_own(key, tokens) if key is not None else Lookup(None, 0, "none")
        result = own
        self._tiers.reserve(lease, reserve_bytes)
        # Another entry may hold more of this sequence (a fork, a longer sibling, the key's
        # checkpoint): copying tokens is far cheaper than prefilling them.
        shared = self._take_shared(key, tokens, own)
        if shared is not None:
            # Whatever the own entry held is dropped: the engine checks in the new history.
            shared.reason, shared.diverged_at = own.reason, own.diverged_at
            if shared.source == "checkpoint":
                shared.reason += f"; resumed from its turn-boundary checkpoint ({shared.cached_tokens} tokens)"
            result = shared
        if result.cache is not None:
            # A cache keeps its allocation when trimmed (a long file, a shorter request).
            nbytes = self._ops.nbytes(result.cache)
            if nbytes > self._tiers.reserved(lease):
                self._tiers.reserve(lease, nbytes)
        self._count(result)
        return result

    def lease(self, key: str | None, tokens: Sequence[int], *, reserve_bytes: int = 0) -> "Lease":
        """``checkout`` under a new lease: the one object a turn holds its cache through."""
        lease = self.new_lease()
        return Lease(self, key, self.checkout(key, tokens, reserve_bytes=reserve_bytes, lease=lease), lease)

    def new_lease(self) -> int:
        """A lease id for ``checkout`` (0 is the default lease, for one cache at a time)."""
        self._next_lease += 1
        return self._next_lease

    def can_reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the memory budget beside the caches checked out (resident
        entries can always be evicted for them)."""
        return self._tiers.can_reserve(nbytes)

    def reserve(self, nbytes: int, *, lease: int = 0) -> None:
        """The turn in flight holds ``nbytes`` more (a checkpoint copy): make room for them."""
        self._tiers.reserve(lease, self._tiers.reserved(lease) + nbytes)

    def release(self, *, lease: int = 0) -> None:
        """The checked-out cache is gone (the turn failed): its reservation ends."""
        self._tiers.release(lease)

    def checkin(
        self,
        key: str | None,
        tokens: Sequence[int],
        cache,
        *,
        checkpoint: tuple[Sequence[int], Any] | None = None,
        lease: int = 0,
    ) -> None:
        """Store ``cache`` (holding exactly ``tokens``) as ``key``'s entry, most recently used;
        ends the reservation of ``lease``.

        ``key`` None stores a one-shot sequence under an anonymous key so its prefix can be
        shared; at most ``max_anonymous`` of those are kept, in memory only. ``checkpoint`` is
        ``(tokens, cache)`` taken at the turn boundary, for a cache that cannot be trimmed; it
        replaces the key's previous checkpoint.
        """
        self._tiers.release(lease)
        self._expire_if_due()
        if key is None:
            key = _anonymous_key(tuple(tokens))
        elif checkpoint is not None:
            self._put(_checkpoint_key(key), checkpoint[0], checkpoint[1])
        self._put(key, tokens, cache)

    def delete(self, key: str) -> bool:
        """Forget ``key`` (and its checkpoint) in both tiers. True if anything was removed."""
        removed = self._tiers.remove(key)
        removed = self._tiers.remove(_checkpoint_key(key)) or removed
        self._gone.pop(key, None)
        return removed

    def clear(self) -> None:
        """Drop everything in memory (the model was switched)."""
        for key in self._tiers.clear():
            if not _is_internal(key):
                self._gone[key] = "stored with another model"

    def reopen(self, fingerprint: str) -> "CacheStore":
        """A store for the model ``fingerprint`` with this one's budgets and directory: the
        same disk tier's files, that model's served (after ``spill`` and ``clear`` here, when
        the resident model is switched)."""
        return CacheStore(self._ops, fingerprint=fingerprint, **self._settings)

    # ------------------------------------------------------------------------------ tiers

    def make_room(self, key: str, tokens: int) -> bool:
        """Allocate room for ``tokens`` more tokens in ``key``'s resident cache, while idle, if
        the memory budget has it (see ``Tiers.make_room``). True if it grew."""
        return self._tiers.make_room(key, tokens)

    def resident(self, key: str):
        """``key``'s cache if it is in memory, else None; to read on the engine thread, between
        turns (it stays the store's: nothing may change it)."""
        return self._tiers.resident(key)

    def persist_next(self) -> bool:
        """Write one memory entry not on disk yet (write-behind), keeping it resident, in the
        background where it can (see ``Tiers.persist_next``). False when nothing was done:
        nothing to write (or no disk tier), or the write in the background still runs."""
        return self._tiers.persist_next()

    @property
    def writing(self) -> bool:
        """Whether a write-behind runs in the background (``persist_next`` ends it once done)."""
        return self._tiers.writing

    def flush(self) -> int:
        """Write every memory entry not on disk yet to the disk tier (at shutdown). Returns how
        many were written (failed writes are not counted)."""
        return self._tiers.flush()

    def spill(self) -> int:
        """Move every memory entry to the disk tier (the model is being unloaded); returns how
        many entries left memory (see ``Tiers.spill``)."""
        return self._tiers.spill()

    def expire(self) -> int:
        """Forget entries (both tiers) unused for ``ttl_s`` seconds. Returns how many."""
        return self._tiers.expire()

    def set_ttl(self, ttl_s: float | None) -> None:
        """Change the idle lifetime of caches (None: forever)."""
        self._settings["ttl_s"] = ttl_s
        self._tiers.set_ttl(ttl_s)

    @property
    def memory_budget(self) -> int:
        """The memory budget in bytes (``max_bytes``)."""
        return self._settings["max_bytes"]

    def set_memory_budget(self, max_bytes: int) -> None:
        """Change the memory budget, evicting at once if it shrank (e.g. memory pressure)."""
        self._settings["max_bytes"] = max_bytes
        self._tiers.set_memory_budget(max_bytes)

    # --------------------------------------------------------------------------- queries

    def tokens_of(self, key: str) -> list[int] | None:
        """The tokens stored for ``key`` (the resident ones if it is in both tiers; no arrays
        loaded), or None. O(1) but for the copy; safe from any thread."""
        where = self._entries.get(key)
        return list(where[1].tokens) if where is not None else None

    def tier_of(self, key: str) -> str:
        """"memory" | "disk" | "none". O(1); safe from any thread."""
        where = self._entries.get(key)
        return where[0] if where is not None else "none"

    def entry_info(self, key: str) -> tuple[str, tuple[int, ...], int] | None:
        """``(tier, tokens, nbytes)`` of ``key``'s entry as ``checkout`` would find it (memory
        if resident, else disk; allocated bytes in memory, file bytes on disk), or None.
        O(1); safe from any thread: one read of a plain dict whose values are never changed in
        place."""
        where = self._entries.get(key)
        if where is None:
            return None
        tier, entry = where
        return tier, entry.tokens, entry.nbytes

    def keys(self) -> list[str]:
        """Conversation keys stored in either tier (each once), most recently used first within
        a tier, memory first."""
        return [k for k in self._tiers.keys() if not _is_internal(k)]

    def stats(self) -> dict:
        """Counters for the status RPC. O(1); safe from any thread."""
        return {
            **self._tiers.stats(),
            "shared_prefix_hits": self._shared_hits,
            "tokens_saved": self._tokens_saved,
        }

    # ---------------------------------------------------------------------------- internals

    def _put(self, key: str, tokens: Sequence[int], cache) -> None:
        tokens = tuple(tokens)
        held = self._ops.num_tokens(cache)
        if held is not None and held != len(tokens):
            raise ValueError(f"cache holds {held} tokens, checkin says {len(tokens)}")
        self._gone.pop(key, None)
        self._tiers.put(key, tokens, cache, one_shot=_is_anonymous(key))

    def _take_own(self, key: str, tokens: tuple[int, ...]) -> Lookup:
        """Remove ``key``'s own entry from whichever tier holds it and trim it for ``tokens``."""
        found = self._tiers.take(key)
        if found is None:
            return Lookup(None, 0, "none", self._gone.get(key, "not cached"))
        tier, entry = found
        stored = entry.tokens
        if not tokens:
            return Lookup(None, 0, "none", f"request ends at token 0 of {len(stored)}", 0)
        plan = plan_reuse(stored, tokens, entry.trimmable)
        if plan.reusable == 0:  # nothing worth handing over (nor a file worth reading)
            return Lookup(None, 0, "none", plan.reason, plan.diverged_at)
        if tier == "memory":
            if plan.needs_trim:
                self._ops.trim(entry.cache, len(stored) - plan.reusable)
            return Lookup(entry.cache, plan.reusable, "conversation", plan.reason,
                          plan.diverged_at, "memory")
        cache = self._tiers.load(key, plan.reusable)
        if cache is None:
            return Lookup(None, 0, "none", self._gone.get(key, "not cached"))
        return Lookup(cache, plan.reusable, "disk", plan.reason, plan.diverged_at, "disk")

    def _take_shared(self, key: str | None, tokens: tuple[int, ...], own: Lookup) -> Lookup | None:
        """Copy more of ``tokens`` than ``own`` gives from another entry: the key's checkpoint
        (whatever its length), or the longest prefix shared with any other entry, of at least
        ``min_shared_prefix`` tokens; the checkpoint first at equal length. When the own entry
        covers the request only the checkpoint is looked at. A candidate that fails to load is
        skipped for the next best."""
        checkpoint = _checkpoint_key(key) if key is not None else None
        first = None
        if checkpoint is not None:
            first = self._entries.candidate(checkpoint, tokens, better_than=own.cached_tokens)
        candidates: Iterable[Candidate] = [first] if first is not None else []
        # Searched only if the own entry does not cover the request: not handed over whole (all
        # its tokens a prefix of the request), nor as much as any entry could give.
        if own.cache is None or (own.diverged_at is not None
                                 and own.cached_tokens < len(tokens) - 1):
            floor = max(own.cached_tokens, self._min_shared_prefix - 1)
            candidates = self._entries.longest(tokens, better_than=floor,
                                               exclude=(key, checkpoint), first=first)
        for cand in candidates:
            cache = self._copy_from(cand, tokens)
            if cache is not None:
                source = "checkpoint" if cand.key == checkpoint else "shared_prefix"
                return Lookup(cache, cand.reusable, source, tier=cand.tier)
        return None

    def _copy_from(self, cand: Candidate, tokens: tuple[int, ...]):
        """A new cache holding the candidate's first ``reusable`` tokens, or None."""
        where = self._entries.get(cand.key)
        if where is None or where[0] != cand.tier:  # dropped since (a corrupt file)
            return None
        if plan_reuse(where[1].tokens, tokens, where[1].trimmable).reusable != cand.reusable:
            return None  # the index trusts block hashes; what is handed out is exact
        if cand.tier == "disk":
            return self._tiers.load(cand.key, cand.reusable)  # a fresh object: no copy needed
        entry = self._tiers.touch(cand.key)  # it earned being recently used
        try:
            return self._ops.copy_prefix(entry.cache, cand.reusable)
        except Exception as e:  # an unsupported cache type must not fail the turn
            log.warning("cannot copy a shared prefix of %d tokens: %s", cand.reusable, e)
            return None

    def _count(self, lookup: Lookup) -> None:
        self._tiers.count(lookup.tier)
        if lookup.source == "shared_prefix":
            self._shared_hits += 1
        self._tokens_saved += lookup.cached_tokens

    def _expire_if_due(self) -> None:
        if self._tiers.expiry_due():
            self.expire()

    def _dropped(self, key: str, reason: str) -> None:
        """The tiers let ``key`` go by themselves (evicted, expired, a corrupt file...)."""
        self._gone[key] = reason


def _anonymous_key(tokens: tuple[int, ...]) -> str:
    return _ANON_PREFIX + hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def _is_anonymous(key: str) -> bool:
    return key.startswith(_ANON_PREFIX)


def _checkpoint_key(key: str) -> str:
    return key + _CHECKPOINT_SUFFIX


def _is_internal(key: str) -> bool:
    """Anonymous (one-shot) entries and checkpoints: stored, but not conversations."""
    return _is_anonymous(key) or key.endswith(_CHECKPOINT_SUFFIX)
