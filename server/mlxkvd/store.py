"""The cache store: token sequences -> KV caches, in memory and on disk.

Pure bookkeeping. No gRPC, no threads, no model: it is called from the engine thread that owns
MLX, and everything that touches a cache object goes through an adapter (``ops``, see
``CacheOps``), so the rules here are tested with fake caches (tests/test_store.py). The disk tier
is ``disk_tier.DiskTier`` (file naming, atomic writes, integrity checks: its own rules); shared
prefixes are found through ``prefix_index.PrefixIndex``.

Rules, in one place:

- One owner. ``checkout`` REMOVES a conversation's own entry from the memory tier and hands the
  cache object to the engine without copying; the engine ``checkin``s it after the turn.
- Write-behind. ``persist_next`` (called by the engine when it is idle, off the path of any turn)
  writes the newest memory entry not yet on disk to the disk tier and keeps it resident, so a
  daemon killed with SIGKILL between turns still finds every conversation's history on disk. A
  key's disk file is only replaced by a newer one, never removed by a checkout or checkin: until
  it is replaced it holds an older, still valid prefix of the conversation.
- ``checkout`` looks for the key's own entry in memory, then on disk. An own entry that covers
  the request (all its tokens are a prefix of it) is the answer, and no other entry is searched
  for (only the key's checkpoint, found by its key, can still give more): a cached turn costs
  what it adds, however many entries are stored. Otherwise the key's checkpoint or the longest
  prefix shared with any other entry, found through the prefix index (copied, never handed
  over), is taken when it gives more. What is handed out is trimmed so that the cache holds
  exactly ``tokens[:cached_tokens]``, with at least one token left to prefill.
- Memory is bounded by allocated bytes (``ops.nbytes``), in LRU order (lru-dict); what does not fit
  spills to the disk tier, which is bounded by file bytes, also in LRU order. The cache a turn has
  checked out counts too: ``checkout(reserve_bytes=...)`` makes room for what it will grow to, so
  resident KV (stored plus in flight) stays within the budget during the turn as well.
- Checkpoints. A cache that cannot be trimmed (sliding-window or recurrent layers) cannot be
  rewound to where a regenerated or rewritten turn diverges. The engine checks in, with it, a
  copy taken at the turn boundary (before the generation prompt); it is stored as an entry of its
  own, under a key derived from the conversation's, and ``checkout`` resumes from it (source
  ``checkpoint``) when the conversation's own cache does not fit the request.
- Nothing is served from a disk file that fails its checks (see ``disk_tier``). Disk errors are
  logged and the entry is dropped; they never escape ``checkin``/``checkout``.
- Threads. Only ``tier_of``, ``entry_info``, ``tokens_of`` and ``stats`` may be called from other
  threads (the gRPC status handlers) while the engine thread changes the store: each is O(1) and
  reads one plain dict entry or a few counters, never a structure being rebuilt. Everything
  else belongs to the engine thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import lru

from .disk_tier import CacheFileError, DiskTier, open_disk_dir
from .prefix_index import DEFAULT_BLOCK, Candidate, EntryIndex, common_prefix_length, plan_reuse

__all__ = ["CacheFileError", "CacheOps", "CacheStore", "Lookup", "common_prefix_length"]

log = logging.getLogger(__name__)

# A shared prefix shorter than this is not worth a copy (and is mostly chat-template boilerplate).
DEFAULT_MIN_SHARED_PREFIX = 16
# One-shot (key None) sequences kept for prefix sharing, memory only.
DEFAULT_MAX_ANONYMOUS = 4
# How many forgotten keys we remember, to say *why* a known conversation was not found.
_GONE_CAPACITY = 4096
# lru-dict needs a capacity; ours are bounded by bytes, not by count.
_UNBOUNDED = 2**31 - 1
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


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: Any
    nbytes: int
    trimmable: bool
    last_used: float
    persisted: bool = False  # the disk tier holds these exact tokens for this key
    write_attempted: bool = False


@dataclass
class _TierStats:
    hits: int = 0
    misses: int = 0


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
    fingerprint are removed at startup. ``max_bytes`` bounds resident (allocated) bytes;
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
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._min_shared_prefix = min_shared_prefix
        self._max_anonymous = max_anonymous
        # lru.LRU rather than OrderedDict: it is the LRU order (keys() is most recent first,
        # peek_last_item() is the eviction victim). Its eviction callback is not used: the
        # budget is in bytes, not entries, so eviction is explicit in _enforce_memory_budget.
        self._mem: lru.LRU = lru.LRU(_UNBOUNDED)
        self._mem_bytes = 0
        self._anonymous = 0  # one-shot entries in memory
        # Bytes each checked-out cache may grow to (see checkout), by lease.
        self._leases: dict[int, int] = {}
        self._next_lease = 1
        self._gone: lru.LRU = lru.LRU(_GONE_CAPACITY)  # key -> why it is no longer stored
        # Where each key's entry is seen (the resident one if it is in both tiers), and by
        # prefix. Every change of where an entry lives goes through _place or _relocate.
        self._entries = EntryIndex(max(1, min(DEFAULT_BLOCK, min_shared_prefix)))
        self._oldest_use = math.inf  # no entry was used before this (see _expire_if_due)
        self._mem_stats = _TierStats()
        self._disk_stats = _TierStats()
        self._shared_hits = 0
        self._tokens_saved = 0
        self._disk: DiskTier | None = None
        directory = open_disk_dir(disk_dir) if disk_dir and max_disk_bytes > 0 else None
        if directory is not None:
            self._disk = DiskTier(ops, directory, fingerprint=fingerprint,
                                  max_bytes=max_disk_bytes, clock=clock,
                                  on_drop=self._dropped_from_disk)
            for key, dentry in self._disk.items():
                self._relocate(key)
                self._oldest_use = min(self._oldest_use, dentry.last_used)
            self._entries.refresh()  # now, rather than in the first turn that searches

    # ----------------------------------------------------------------------------- public API

    @property
    def _reserved(self) -> int:
        return sum(self._leases.values())

    def can_reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the memory budget beside the caches checked out (resident
        entries can always be evicted for them)."""
        return self._reserved + nbytes <= self._max_bytes

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
        self._leases[lease] = reserve_bytes
        self._enforce_memory_budget()
        # Another entry may hold more of this sequence (a fork, a longer sibling, the key's
        # checkpoint): copying tokens is far cheaper than prefilling them.
        shared = self._take_shared(key, tokens, own)
        if shared is not None:
            # Whatever the own entry held is dropped: the engine checks in the new history.
            shared.reason, shared.diverged_at = own.reason, own.diverged_at
            if shared.source == "checkpoint":
                shared.reason += f"; resumed from its turn-boundary checkpoint ({shared.cached_tokens} tokens)"
            result = shared
        if result.cache is not None and self._ops.nbytes(result.cache) > self._leases[lease]:
            # A cache keeps its allocation when trimmed (a long file, a shorter request).
            self._leases[lease] = self._ops.nbytes(result.cache)
            self._enforce_memory_budget()
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

    def reserve(self, nbytes: int, *, lease: int = 0) -> None:
        """The turn in flight holds ``nbytes`` more (a checkpoint copy): make room for them."""
        self._leases[lease] = self._leases.get(lease, 0) + nbytes
        self._enforce_memory_budget()

    def spill(self) -> int:
        """Move every memory entry to the disk tier (the model is being unloaded), writing
        those not on disk yet. One-shot entries are dropped; an entry that cannot be written
        stays in memory. Returns how many entries left memory."""
        if self._disk is None:
            return 0
        moved = 0
        for key, entry in list(reversed(self._mem.items())):  # least recently used first
            if _is_anonymous(key) or self._on_disk(key, entry):
                self._pop_memory(key)
                moved += 1
        return moved

    def release(self, *, lease: int = 0) -> None:
        """The checked-out cache is gone (the turn failed): its reservation ends."""
        self._leases.pop(lease, None)

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
        ends the reservation of ``checkout``.

        ``key`` None stores a one-shot sequence under an anonymous key so its prefix can be
        shared; at most ``max_anonymous`` of those are kept, in memory only. ``checkpoint`` is
        ``(tokens, cache)`` taken at the turn boundary, for a cache that cannot be trimmed; it
        replaces the key's previous checkpoint. Ends the reservation of ``lease``.
        """
        self._leases.pop(lease, None)
        self._expire_if_due()
        if key is None:
            key = self._anonymous_key(tuple(tokens))
        elif checkpoint is not None:
            self._put(_checkpoint_key(key), checkpoint[0], checkpoint[1])
        self._put(key, tokens, cache)

    def _put(self, key: str, tokens: Sequence[int], cache) -> None:
        tokens = tuple(tokens)
        held = self._ops.num_tokens(cache)
        if held is not None and held != len(tokens):
            raise ValueError(f"cache holds {held} tokens, checkin says {len(tokens)}")
        # The key's disk file (if any) stays until persist_next replaces it: a crash before
        # then still leaves a valid prefix of this conversation on disk.
        self._pop_memory(key)
        self._gone.pop(key, None)
        if not tokens:
            return
        entry = _Entry(tokens, cache, self._ops.nbytes(cache), self._ops.can_trim(cache),
                       self._clock())
        if entry.nbytes > self._max_bytes:
            self._evict(key, entry)
            return
        self._place(key, entry)
        self._enforce_memory_budget()

    def make_room(self, key: str, tokens: int) -> bool:
        """Allocate room for ``tokens`` more tokens in ``key``'s resident cache, if the memory
        budget has it beside the other entries (nothing is evicted for it). A cache grows by
        copying everything it holds; done now, while idle, the next turn's prefill writes in
        place instead of copying the whole history before its first token. True if it grew."""
        entry = self._mem.get(key)
        if entry is None:
            return False
        grown = self._ops.nbytes_with_room(entry.cache, tokens)
        if grown <= entry.nbytes or self._mem_bytes + self._reserved + grown - entry.nbytes > self._max_bytes:
            return False
        self._ops.make_room(entry.cache, tokens)
        # Entries are replaced, never changed in place (entry_info reads them from any thread).
        self._pop_memory(key)
        self._place(key, dataclasses.replace(entry, nbytes=self._ops.nbytes(entry.cache)))
        return True

    def delete(self, key: str) -> bool:
        """Forget ``key`` (and its checkpoint) in both tiers. True if anything was removed."""
        removed = self._remove(key)
        removed = self._remove(_checkpoint_key(key)) or removed
        self._gone.pop(key, None)
        return removed

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
        on_disk = self._disk.keys() if self._disk is not None else []
        keys = dict.fromkeys([*self._mem.keys(), *on_disk])  # a key can be in both
        return [k for k in keys if not _is_internal(k)]

    def persist_next(self) -> bool:
        """Write the most recently used memory entry that is not on disk yet, keeping it
        resident. False when there is nothing to write (or no disk tier)."""
        return self._persist_one() is not None

    def flush(self) -> int:
        """Write every memory entry not on disk yet to the disk tier (at shutdown). Returns how
        many were written (failed writes are not counted); without a disk tier, nothing is
        written."""
        written = 0
        while (ok := self._persist_one()) is not None:
            written += ok
        return written

    def _persist_one(self) -> bool | None:
        """One step of ``persist_next``: None if there was nothing to write, else whether the
        write succeeded."""
        if self._disk is None:
            return None
        # Least recently used first, so that the disk tier's LRU order (a write makes a file the
        # most recent) ends up matching memory's, and its budget evicts the oldest conversation.
        # items() is most recent first and does not touch the order.
        for key, entry in reversed(self._mem.items()):
            if entry.write_attempted or _is_anonymous(key):
                continue
            # A failed write (disk full, too large for the budget) is not retried on every
            # idle moment; the next checkin of the key makes it a candidate again.
            entry.write_attempted = True
            entry.persisted = self._write(key, entry)
            return entry.persisted
        return None

    def clear(self) -> None:
        """Drop everything in memory (the model was switched)."""
        for key in list(self._mem.keys()):
            self._pop_memory(key)
            if not _is_internal(key):
                self._gone[key] = "stored with another model"

    def expire(self) -> int:
        """Forget entries (both tiers) unused for ``ttl_s`` seconds. Returns how many."""
        if self._ttl_s is None:
            return 0
        deadline = self._clock() - self._ttl_s
        count = 0
        for key, entry in list(self._mem.items()):
            if entry.last_used < deadline:
                self._pop_memory(key)
                self._gone[key] = "expired"
                count += 1
        for key in self._disk.expire(deadline) if self._disk is not None else []:
            self._relocate(key)
            self._gone[key] = "expired"
            count += 1
        uses = [e.last_used for _, e in self._mem.items()]
        uses += [d.last_used for _, d in (self._disk.items() if self._disk is not None else [])]
        self._oldest_use = min(uses, default=math.inf)
        if count:
            log.info("expired %d cache entries unused for %.0f s", count, self._ttl_s)
        return count

    def set_ttl(self, ttl_s: float | None) -> None:
        """Change the idle lifetime of caches (None: forever)."""
        self._ttl_s = ttl_s

    def set_memory_budget(self, max_bytes: int) -> None:
        """Change the memory budget, evicting at once if it shrank (e.g. memory pressure)."""
        self._max_bytes = max_bytes
        self._enforce_memory_budget()

    def stats(self) -> dict:
        """Counters for the status RPC. O(1); safe from any thread."""
        disk = self._disk
        return {
            "memory": {
                "entries": len(self._mem),
                "bytes": self._mem_bytes,
                "in_flight_bytes": self._reserved,
                "budget_bytes": self._max_bytes,
                "hits": self._mem_stats.hits,
                "misses": self._mem_stats.misses,
            },
            "disk": {
                "enabled": disk is not None,
                "entries": len(disk) if disk is not None else 0,
                "bytes": disk.nbytes if disk is not None else 0,
                "budget_bytes": disk.max_bytes if disk is not None else 0,
                "hits": self._disk_stats.hits,
                "misses": self._disk_stats.misses,
            },
            "shared_prefix_hits": self._shared_hits,
            "tokens_saved": self._tokens_saved,
        }

    # ---------------------------------------------------------------------------- checkout

    def _take_own(self, key: str, tokens: tuple[int, ...]) -> Lookup:
        """Remove ``key``'s own entry from whichever tier holds it and trim it for ``tokens``."""
        entry = self._pop_memory(key)
        if entry is not None:
            stored, trimmable = entry.tokens, entry.trimmable
        else:
            dentry = self._disk.get(key) if self._disk is not None else None
            if dentry is None:
                return Lookup(None, 0, "none", self._gone.get(key, "not cached"))
            stored, trimmable = dentry.tokens, dentry.trimmable
        if not tokens:
            return Lookup(None, 0, "none", f"request ends at token 0 of {len(stored)}", 0)
        plan = plan_reuse(stored, tokens, trimmable)
        if plan.reusable == 0:  # nothing worth handing over (nor a file worth reading)
            return Lookup(None, 0, "none", plan.reason, plan.diverged_at)
        if entry is not None:
            if plan.needs_trim:
                self._ops.trim(entry.cache, len(stored) - plan.reusable)
            return Lookup(entry.cache, plan.reusable, "conversation", plan.reason,
                          plan.diverged_at, "memory")
        # A fresh object read from the file: the file stays, a valid prefix until replaced.
        cache = self._disk.load(key, plan.reusable)
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
            return self._disk.load(cand.key, cand.reusable)  # a fresh object: no copy needed
        entry = self._mem[cand.key]  # indexing marks it recently used: it earned it
        entry.last_used = self._clock()
        try:
            return self._ops.copy_prefix(entry.cache, cand.reusable)
        except Exception as e:  # an unsupported cache type must not fail the turn
            log.warning("cannot copy a shared prefix of %d tokens: %s", cand.reusable, e)
            return None

    def _count(self, lookup: Lookup) -> None:
        if lookup.tier == "memory":
            self._mem_stats.hits += 1
        else:
            self._mem_stats.misses += 1
            if self._disk is not None:
                if lookup.tier == "disk":
                    self._disk_stats.hits += 1
                else:
                    self._disk_stats.misses += 1
        if lookup.source == "shared_prefix":
            self._shared_hits += 1
        self._tokens_saved += lookup.cached_tokens

    # ------------------------------------------------------------------- where entries live

    def _place(self, key: str, entry: _Entry) -> None:
        """Make ``entry`` the resident entry of ``key`` (not there yet), most recently used."""
        self._mem[key] = entry
        self._mem_bytes += entry.nbytes
        self._anonymous += _is_anonymous(key)
        self._entries.set(key, "memory", entry)
        self._oldest_use = min(self._oldest_use, entry.last_used)

    def _pop_memory(self, key: str) -> _Entry | None:
        entry = self._mem.pop(key, None)
        if entry is not None:
            self._mem_bytes -= entry.nbytes
            self._anonymous -= _is_anonymous(key)
            self._relocate(key)
        return entry

    def _relocate(self, key: str) -> None:
        """``key`` left memory, or its disk file changed: record where it is now seen."""
        if key in self._mem:  # the resident entry is the one seen; _place recorded it
            return
        dentry = self._disk.peek(key) if self._disk is not None else None
        if dentry is None:
            self._entries.discard(key)
        else:
            self._entries.set(key, "disk", dentry)

    def _dropped_from_disk(self, key: str, reason: str) -> None:
        """The disk tier dropped ``key``'s file by itself (evicted, corrupt, another model)."""
        self._gone[key] = reason
        self._relocate(key)

    def _enforce_memory_budget(self) -> None:
        while self._mem_bytes + self._reserved > self._max_bytes and len(self._mem):
            key, _ = self._mem.peek_last_item()
            self._evict(key, self._pop_memory(key))
        if self._anonymous > self._max_anonymous:
            anonymous = [k for k in self._mem.keys() if _is_anonymous(k)]  # most recent first
            for key in anonymous[self._max_anonymous :]:
                self._pop_memory(key)

    def _evict(self, key: str, entry: _Entry) -> bool:
        """Move an entry out of memory: to disk if there is a disk tier, else drop it.
        True if it went to disk. One-shot entries are never written."""
        if self._on_disk(key, entry):
            return True
        if not _is_anonymous(key):
            self._gone[key] = "evicted"
        return False

    def _on_disk(self, key: str, entry: _Entry) -> bool:
        """Make sure the disk tier holds ``entry`` (writing it if need be); False if it cannot
        (no disk tier, a failed write, a one-shot entry)."""
        if self._disk is None or _is_anonymous(key):
            return False
        if entry.persisted and key in self._disk:
            return True
        return self._write(key, entry)

    def _write(self, key: str, entry: _Entry) -> bool:
        ok = self._disk.write(key, entry.tokens, entry.cache, last_used=entry.last_used)
        self._oldest_use = min(self._oldest_use, entry.last_used)
        self._relocate(key)
        return ok

    def _anonymous_key(self, tokens: tuple[int, ...]) -> str:
        return _ANON_PREFIX + hashlib.sha256(json.dumps(tokens).encode()).hexdigest()

    def _remove(self, key: str) -> bool:
        in_memory = self._pop_memory(key) is not None
        on_disk = self._disk is not None and self._disk.remove(key)
        self._relocate(key)
        return in_memory or on_disk

    def _expire_if_due(self) -> None:
        # Nothing can have expired before the least recently used entry did: an O(1) test per
        # turn instead of a pass over every entry.
        if self._ttl_s is not None and self._clock() - self._ttl_s > self._oldest_use:
            self.expire()


def _is_anonymous(key: str) -> bool:
    return key.startswith(_ANON_PREFIX)


def _checkpoint_key(key: str) -> str:
    return key + _CHECKPOINT_SUFFIX


def _is_internal(key: str) -> bool:
    """Anonymous (one-shot) entries and checkpoints: stored, but not conversations."""
    return _is_anonymous(key) or key.endswith(_CHECKPOINT_SUFFIX)
