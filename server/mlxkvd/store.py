"""The cache store: token sequences -> KV caches, in memory and on disk.

Pure bookkeeping. No gRPC, no threads, no model: it is called only from the engine thread that
owns MLX, and everything that touches a cache object goes through an adapter (``ops``, see
``CacheOps``), so the rules here are tested with fake caches (tests/test_store.py).

Rules, in one place:

- One owner. ``checkout`` REMOVES a conversation's own entry from the memory tier and hands the
  cache object to the engine without copying; the engine ``checkin``s it after the turn.
- Write-behind. ``persist_next`` (called by the engine when it is idle, off the path of any turn)
  writes the newest memory entry not yet on disk to the disk tier and keeps it resident, so a
  daemon killed with SIGKILL between turns still finds every conversation's history on disk. A
  key's disk file is only replaced by a newer one, never removed by a checkout or checkin: until
  it is replaced it holds an older, still valid prefix of the conversation.
- ``checkout`` looks for the key's own entry in memory, then on disk, then for the longest shared
  prefix with any other entry (copied, never handed over), and trims what it hands out so that the
  cache holds exactly ``tokens[:cached_tokens]``, with at least one token left to prefill.
- Memory is bounded by allocated bytes (``ops.nbytes``), in LRU order (lru-dict); what does not fit
  spills to the disk tier, which is bounded by file bytes, also in LRU order. The cache a turn has
  checked out counts too: ``checkout(reserve_bytes=...)`` makes room for what it will grow to, so
  resident KV (stored plus in flight) stays within the budget during the turn as well.
- Checkpoints. A cache that cannot be trimmed (sliding-window or recurrent layers) cannot be
  rewound to where a regenerated or rewritten turn diverges. The engine checks in, with it, a
  copy taken at the turn boundary (before the generation prompt); it is stored as an entry of its
  own, under a key derived from the conversation's, and ``checkout`` resumes from it (source
  ``checkpoint``) when the conversation's own cache does not fit the request.
- Disk files are named by sha256(fingerprint, key), written to a temporary name and renamed, and
  carry the exact tokens, the key, the model fingerprint and a checksum in their metadata. A file
  that is unreadable, corrupt, or made with another model is removed, never served. Disk errors
  are logged and the entry is dropped; they never escape ``checkin``/``checkout``.

Integrity: the checksum is computed by ``ops.save`` and verified by ``ops.load`` (they are the
only ones that see the array bytes); it covers the metadata (hence the tokens) and the arrays.
``ops.load`` raises on mismatch; the store additionally checks that the loaded metadata and token
count match its index.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import lru

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
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
_TMP_PREFIX = ".tmp-"


class CacheFileError(Exception):
    """A disk-tier file is unreadable, truncated, or fails its checksum."""


class CacheOps(Protocol):
    """What the store needs to know about cache objects. ``kvcache.MlxCacheOps`` is the real one."""

    file_suffix: str

    def nbytes(self, cache) -> int: ...  # allocated bytes, not tokens used
    def num_tokens(self, cache) -> int | None: ...  # None: the cache does not count them
    def can_trim(self, cache) -> bool: ...
    def trim(self, cache, n: int) -> None: ...  # drop the last n tokens, in place
    def copy_prefix(self, cache, n: int) -> Any: ...  # a new cache with the first n tokens
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
    last_used: float
    persisted: bool = False  # the disk tier holds these exact tokens for this key
    write_attempted: bool = False


@dataclass
class _DiskEntry:
    tokens: tuple[int, ...]
    path: Path
    size: int
    trimmable: bool
    last_used: float


@dataclass
class _TierStats:
    hits: int = 0
    misses: int = 0


@dataclass
class _Candidate:
    """A place a cache could come from, before it is actually taken."""

    key: str
    tier: str  # "memory" | "disk"
    reusable: int  # tokens it would give


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; compares tuples block by block at C speed."""
    a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    lo, block = 0, 256
    while lo < n:
        hi = min(lo + block, n)
        if a[lo:hi] != b[lo:hi]:
            while a[lo] == b[lo]:
                lo += 1
            return lo
        lo = hi
    return n


@dataclass
class _Plan:
    """How much of a stored sequence a request can reuse."""

    reusable: int
    reason: str = ""
    diverged_at: int | None = None
    needs_trim: bool = False


def _plan(stored: Sequence[int], tokens: Sequence[int], trimmable: bool) -> _Plan:
    lcp = common_prefix_length(stored, tokens)
    reusable = min(lcp, len(tokens) - 1)
    if reusable == len(stored):
        return _Plan(reusable)
    if lcp < min(len(stored), len(tokens)):
        reason = f"diverged at token {lcp} of {len(stored)}"
    else:  # the request is a prefix of what is stored (regenerate), or equal to it
        reason = f"request ends at token {len(tokens)} of {len(stored)}"
    if not trimmable:
        return _Plan(0, reason + "; cache cannot be trimmed", lcp)
    return _Plan(reusable, reason, lcp, needs_trim=True)


class CacheStore:
    """Per-conversation KV caches in a memory tier and an optional disk tier.

    ``fingerprint`` names the model the caches were made with; disk files with another
    fingerprint are removed at startup. ``max_bytes`` bounds resident (allocated) bytes;
    0 keeps nothing in memory. ``max_disk_bytes`` bounds the disk tier (0 or no ``disk_dir``:
    no disk tier). ``ttl_s`` forgets entries unused for that long (see ``expire``).
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
        self._fingerprint = fingerprint
        self._max_bytes = max_bytes
        self._max_disk_bytes = max_disk_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._min_shared_prefix = min_shared_prefix
        self._max_anonymous = max_anonymous
        # lru.LRU rather than OrderedDict: it is the LRU order (keys() is most recent first,
        # peek_last_item() is the eviction victim). Its eviction callback is not used: the
        # budget is in bytes, not entries, so eviction is explicit in _enforce_*_budget.
        self._mem: lru.LRU = lru.LRU(_UNBOUNDED)
        self._mem_bytes = 0
        self._reserved = 0  # bytes the checked-out cache may grow to (see checkout)
        self._disk: lru.LRU = lru.LRU(_UNBOUNDED)
        self._disk_bytes = 0
        self._gone: lru.LRU = lru.LRU(_GONE_CAPACITY)  # key -> why it is no longer stored
        self._mem_stats = _TierStats()
        self._disk_stats = _TierStats()
        self._shared_hits = 0
        self._tokens_saved = 0
        self._last_disk_error = ""
        self._disk_dir = self._open_disk_dir(disk_dir) if disk_dir and max_disk_bytes > 0 else None
        if self._disk_dir is not None:
            self._scan_disk()

    # ----------------------------------------------------------------------------- public API

    def checkout(self, key: str | None, tokens: Sequence[int], *, reserve_bytes: int = 0) -> Lookup:
        """Hand the caller the best cache for ``tokens``; the caller owns it until ``checkin``
        (or ``release``).

        The key's own entry (memory, then disk) is removed from the store and handed over
        without a copy. If another entry shares a longer prefix with ``tokens`` (the own entry
        diverged early or was not found), of at least ``min_shared_prefix`` tokens, that prefix
        is copied instead and the own entry is dropped; the key's own checkpoint is such an
        entry, whatever its length. Always ``cached_tokens < len(tokens)``.

        ``reserve_bytes`` is what the handed-out cache may grow to during the turn: other
        entries are evicted (to disk) until it fits the memory budget beside them.
        """
        tokens = tuple(tokens)
        self._expire_if_due()
        own = self._take_own(key, tokens) if key is not None else Lookup(None, 0, "none")
        result = own
        self._reserved = reserve_bytes
        self._enforce_memory_budget()
        # Another entry may hold more of this sequence (a fork, a longer sibling, the key's
        # checkpoint): copying tokens is far cheaper than prefilling them.
        checkpoint = _checkpoint_key(key) if key is not None else None
        floor = max(own.cached_tokens, self._min_shared_prefix - 1)
        shared = self._take_shared(
            tokens, exclude=key, better_than=floor, prefer=checkpoint, prefer_above=own.cached_tokens
        )
        if shared is not None:
            # Whatever the own entry held is dropped: the engine checks in the new history.
            shared.reason, shared.diverged_at = own.reason, own.diverged_at
            if shared.source == "checkpoint":
                shared.reason += f"; resumed from its turn-boundary checkpoint ({shared.cached_tokens} tokens)"
            result = shared
        if result.cache is not None and self._ops.nbytes(result.cache) > self._reserved:
            # A cache keeps its allocation when trimmed (a long file, a shorter request).
            self._reserved = self._ops.nbytes(result.cache)
            self._enforce_memory_budget()
        self._count(result)
        return result

    def reserve(self, nbytes: int) -> None:
        """The turn in flight holds ``nbytes`` more (a checkpoint copy): make room for them."""
        self._reserved += nbytes
        self._enforce_memory_budget()

    def spill(self) -> int:
        """Move every memory entry to the disk tier (the model is being unloaded), writing
        those not on disk yet. One-shot entries are dropped; an entry that cannot be written
        stays in memory. Returns how many entries left memory."""
        if self._disk_dir is None:
            return 0
        moved = 0
        for key, entry in list(reversed(self._mem.items())):  # least recently used first
            if _is_anonymous(key) or self._on_disk(key, entry):
                self._pop_memory(key)
                moved += 1
        return moved

    def release(self) -> None:
        """The checked-out cache is gone (the turn failed): its reservation ends."""
        self._reserved = 0

    def checkin(
        self,
        key: str | None,
        tokens: Sequence[int],
        cache,
        *,
        checkpoint: tuple[Sequence[int], Any] | None = None,
    ) -> None:
        """Store ``cache`` (holding exactly ``tokens``) as ``key``'s entry, most recently used;
        ends the reservation of ``checkout``.

        ``key`` None stores a one-shot sequence under an anonymous key so its prefix can be
        shared; at most ``max_anonymous`` of those are kept, in memory only. ``checkpoint`` is
        ``(tokens, cache)`` taken at the turn boundary, for a cache that cannot be trimmed; it
        replaces the key's previous checkpoint.
        """
        self._reserved = 0
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
        entry = _Entry(tokens, cache, self._ops.nbytes(cache), self._clock())
        if entry.nbytes > self._max_bytes:
            self._evict(key, entry)
            return
        self._mem[key] = entry
        self._mem_bytes += entry.nbytes
        self._enforce_memory_budget()

    def delete(self, key: str) -> bool:
        """Forget ``key`` (and its checkpoint) in both tiers. True if anything was removed."""
        removed = self._remove(key)
        removed = self._remove(_checkpoint_key(key)) or removed
        self._gone.pop(key, None)
        return removed

    def tokens_of(self, key: str) -> list[int] | None:
        """The tokens stored for ``key`` in either tier (no arrays loaded), or None."""
        entry = self._peek(self._mem, key)
        if entry is None:
            entry = self._peek(self._disk, key)
        return list(entry.tokens) if entry is not None else None

    def tier_of(self, key: str) -> str:
        """"memory" | "disk" | "none"."""
        if key in self._mem:
            return "memory"
        if key in self._disk:
            return "disk"
        return "none"

    def keys(self) -> list[str]:
        """Conversation keys stored in either tier (each once), most recently used first within
        a tier, memory first."""
        keys = dict.fromkeys([*self._mem.keys(), *self._disk.keys()])  # a key can be in both
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
        if self._disk_dir is None:
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
            entry.persisted = self._write_disk(key, entry)
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
        for key, dentry in list(self._disk.items()):
            if dentry.last_used < deadline:
                self._pop_disk(key)
                self._gone[key] = "expired"
                count += 1
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
        """Counters for the status RPC."""
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
                "enabled": self._disk_dir is not None,
                "entries": len(self._disk),
                "bytes": self._disk_bytes,
                "budget_bytes": self._max_disk_bytes if self._disk_dir is not None else 0,
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
            stored, trimmable = entry.tokens, self._ops.can_trim(entry.cache)
        else:
            dentry = self._disk.get(key)
            if dentry is None:
                return Lookup(None, 0, "none", self._gone.get(key, "not cached"))
            stored, trimmable = dentry.tokens, dentry.trimmable
        if not tokens:
            return Lookup(None, 0, "none", f"request ends at token 0 of {len(stored)}", 0)
        plan = _plan(stored, tokens, trimmable)
        if plan.reusable == 0:  # nothing worth handing over (nor a file worth reading)
            return Lookup(None, 0, "none", plan.reason, plan.diverged_at)
        if entry is not None:
            if plan.needs_trim:
                self._ops.trim(entry.cache, len(stored) - plan.reusable)
            return Lookup(entry.cache, plan.reusable, "conversation", plan.reason,
                          plan.diverged_at, "memory")
        # A fresh object read from the file: the file stays, a valid prefix until replaced.
        cache = self._load_disk(key, dentry)
        if cache is None:
            return Lookup(None, 0, "none", self._gone.get(key, "not cached"))
        dentry.last_used = self._clock()
        cache = self._fit(cache, len(stored), plan.reusable)
        return Lookup(cache, plan.reusable, "disk", plan.reason, plan.diverged_at, "disk")

    def _take_shared(
        self,
        tokens,
        *,
        exclude: str | None,
        better_than: int,
        prefer: str | None = None,
        prefer_above: int = 0,
    ) -> Lookup | None:
        """Copy the longest prefix of ``tokens`` held by another entry, if longer than
        ``better_than`` (or, for the entry ``prefer``, than ``prefer_above``). A candidate that
        fails to load is skipped for the next best."""
        candidates = []
        for tier, table in (("memory", self._mem), ("disk", self._disk)):
            for key, entry in table.items():
                if key == exclude or (tier == "disk" and key in self._mem):
                    continue
                trimmable = (
                    self._ops.can_trim(entry.cache) if tier == "memory" else entry.trimmable
                )
                plan = _plan(entry.tokens, tokens, trimmable)
                if plan.reusable > (prefer_above if key == prefer else better_than):
                    candidates.append(_Candidate(key, tier, plan.reusable))
        # Longest first; the preferred entry, then memory before disk at equal length.
        candidates.sort(key=lambda c: (-c.reusable, c.key != prefer, c.tier != "memory"))
        for cand in candidates:
            cache = self._copy_from(cand)
            if cache is not None:
                source = "checkpoint" if cand.key == prefer else "shared_prefix"
                return Lookup(cache, cand.reusable, source, tier=cand.tier)
        return None

    def _copy_from(self, cand: _Candidate):
        """A new cache holding the candidate's first ``reusable`` tokens, or None."""
        if cand.tier == "memory":
            entry = self._mem[cand.key]  # indexing marks it recently used: it earned it
            entry.last_used = self._clock()
            try:
                return self._ops.copy_prefix(entry.cache, cand.reusable)
            except Exception as e:  # an unsupported cache type must not fail the turn
                log.warning("cannot copy a shared prefix of %d tokens: %s", cand.reusable, e)
                return None
        dentry = self._disk[cand.key]
        cache = self._load_disk(cand.key, dentry)  # a fresh object: no copy needed
        if cache is not None:
            dentry.last_used = self._clock()
            cache = self._fit(cache, len(dentry.tokens), cand.reusable)
        return cache

    def _fit(self, cache, held: int, n: int):
        """A cache loaded from disk, cut to its first ``n`` of ``held`` tokens. Trimming keeps
        the allocation of all ``held``, so a large cut is copied instead: a long file must not
        hold memory for tokens nobody uses."""
        if held - n <= n:
            if held > n:
                self._ops.trim(cache, held - n)
            return cache
        return self._ops.copy_prefix(cache, n)

    def _count(self, lookup: Lookup) -> None:
        if lookup.tier == "memory":
            self._mem_stats.hits += 1
        else:
            self._mem_stats.misses += 1
            if self._disk_dir is not None:
                if lookup.tier == "disk":
                    self._disk_stats.hits += 1
                else:
                    self._disk_stats.misses += 1
        if lookup.source == "shared_prefix":
            self._shared_hits += 1
        self._tokens_saved += lookup.cached_tokens

    # ----------------------------------------------------------------------------- memory tier

    @staticmethod
    def _peek(table: lru.LRU, key: str):
        # lru-dict has no peek(key): ``table[key]`` and ``get`` mark the key recently used,
        # ``in`` and ``items()`` do not. A status query must not change the eviction order.
        if key not in table:
            return None
        return next(entry for k, entry in table.items() if k == key)

    def _pop_memory(self, key: str) -> _Entry | None:
        entry = self._mem.pop(key, None)
        if entry is not None:
            self._mem_bytes -= entry.nbytes
        return entry

    def _enforce_memory_budget(self) -> None:
        while self._mem_bytes + self._reserved > self._max_bytes and len(self._mem):
            key, _ = self._mem.peek_last_item()
            self._evict(key, self._pop_memory(key))
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
        if _is_anonymous(key):
            return False
        if entry.persisted and key in self._disk:
            return True
        return self._disk_dir is not None and self._write_disk(key, entry)

    def _anonymous_key(self, tokens: tuple[int, ...]) -> str:
        return _ANON_PREFIX + hashlib.sha256(json.dumps(tokens).encode()).hexdigest()

    def _remove(self, key: str) -> bool:
        in_memory = self._pop_memory(key) is not None
        on_disk = self._pop_disk(key)
        return in_memory or on_disk

    def _expire_if_due(self) -> None:
        if self._ttl_s is not None:
            self.expire()

    # ------------------------------------------------------------------------------- disk tier

    def _open_disk_dir(self, disk_dir: Path) -> Path | None:
        try:
            disk_dir = Path(disk_dir)
            disk_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(disk_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(disk_dir))
        except OSError as e:
            log.warning("disk cache tier disabled: cannot use %s: %s", disk_dir, e)
            return None
        return disk_dir

    def _path_for(self, key: str) -> Path:
        assert self._disk_dir is not None
        name = hashlib.sha256(f"{self._fingerprint}\x00{key}".encode()).hexdigest()
        return self._disk_dir / (name + self._ops.file_suffix)

    def _scan_disk(self) -> None:
        """Build the disk index from file metadata (no arrays), oldest first so that the most
        recently written file ends up most recently used; remove what cannot be served."""
        assert self._disk_dir is not None
        found = []
        for path in self._disk_dir.iterdir():
            if path.name.startswith(_TMP_PREFIX):  # a write interrupted by a crash
                self._unlink(path)
                continue
            if not path.name.endswith(self._ops.file_suffix) or not path.is_file():
                continue
            try:
                st = path.stat()
                meta = self._ops.read_metadata(path)
                key, tokens = meta["key"], tuple(json.loads(meta["tokens"]))
                fingerprint = meta["fingerprint"]
                trimmable = meta["trimmable"] == "1"
                if meta["index_checksum"] != _index_checksum(meta):
                    raise CacheFileError("metadata checksum mismatch")
            except (OSError, CacheFileError, KeyError, ValueError, TypeError) as e:
                log.warning("disk cache: removing unreadable file %s: %s", path.name, e)
                self._unlink(path)
                continue
            if fingerprint != self._fingerprint:
                log.info("disk cache: removing %s, stored with another model", path.name)
                self._gone[key] = "stored with another model"
                self._unlink(path)
                continue
            if path != self._path_for(key) or not all(isinstance(t, int) for t in tokens):
                log.warning("disk cache: removing %s, its metadata does not match its name",
                            path.name)
                self._unlink(path)
                continue
            found.append((st.st_mtime, key, _DiskEntry(tokens, path, st.st_size, trimmable, 0)))
        now_wall, now = time.time(), self._clock()
        for mtime, key, dentry in sorted(found, key=lambda f: f[0]):
            dentry.last_used = now - max(0.0, now_wall - mtime)
            self._disk[key] = dentry
            self._disk_bytes += dentry.size
        if found:
            log.info("disk cache: %d entries, %d bytes", len(found), self._disk_bytes)
        self._enforce_disk_budget()

    def _write_disk(self, key: str, entry: _Entry) -> bool:
        """Write ``entry`` as ``key``'s disk file, atomically. False (logged) on any failure."""
        path = self._path_for(key)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
        metadata = {
            "format": FORMAT_VERSION,
            "key": key,
            "fingerprint": self._fingerprint,
            "tokens": json.dumps(list(entry.tokens)),
            "trimmable": "1" if self._ops.can_trim(entry.cache) else "0",
        }
        metadata["index_checksum"] = _index_checksum(metadata)
        try:
            self._ops.save(tmp, entry.cache, metadata)
            os.replace(tmp, path)
            size = path.stat().st_size
        except Exception as e:  # OSError mostly; MLX raises RuntimeError for I/O failures
            self._disk_error("write", path, e)
            self._unlink(tmp)
            return False
        self._last_disk_error = ""
        self._pop_disk(key, unlink=False)  # replaced in place by os.replace
        if size > self._max_disk_bytes:  # would push out everything else and still not fit
            self._unlink(path)
            return False
        self._disk[key] = _DiskEntry(entry.tokens, path, size, metadata["trimmable"] == "1",
                                     entry.last_used)
        self._disk_bytes += size
        self._enforce_disk_budget()
        return key in self._disk

    def _load_disk(self, key: str, dentry: _DiskEntry):
        """Load ``key``'s cache from disk, or None (logged, file removed) if it can't be trusted."""
        try:
            cache, meta = self._ops.load(dentry.path)
            if (
                meta.get("key") != key
                or meta.get("fingerprint") != self._fingerprint
                or tuple(json.loads(meta.get("tokens", "null"))) != dentry.tokens
                or self._ops.num_tokens(cache) not in (None, len(dentry.tokens))
            ):
                raise CacheFileError("contents do not match the index")
        except Exception as e:
            log.warning("disk cache: removing %s: %s", dentry.path.name, e)
            self._pop_disk(key)
            self._gone[key] = "cache file was corrupt"
            return None
        return cache

    def _pop_disk(self, key: str, *, unlink: bool = True) -> bool:
        dentry = self._disk.pop(key, None)
        if dentry is None:
            return False
        self._disk_bytes -= dentry.size
        if unlink:
            self._unlink(dentry.path)
        return True

    def _enforce_disk_budget(self) -> None:
        while self._disk_bytes > self._max_disk_bytes and len(self._disk):
            key, _ = self._disk.peek_last_item()
            self._pop_disk(key)
            self._gone[key] = "evicted"

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self._disk_error("remove", path, e)

    def _disk_error(self, action: str, path: Path, error: BaseException) -> None:
        # One clear line per kind of failure; a full or read-only disk would otherwise log the
        # same line on every eviction. A success in between re-arms the warning.
        kind = f"{action}:{type(error).__name__}:{getattr(error, 'errno', None)}"
        level = logging.DEBUG if kind == self._last_disk_error else logging.WARNING
        log.log(level, "disk cache: cannot %s %s: %s; serving from memory only",
                action, path.name, error)
        self._last_disk_error = kind


def _index_checksum(metadata: dict[str, str]) -> str:
    """sha256 of what the disk index trusts without loading arrays (``ops.load`` verifies the
    full checksum, arrays included, before anything is handed out)."""
    fields = [metadata[k] for k in ("format", "key", "fingerprint", "tokens", "trimmable")]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _is_anonymous(key: str) -> bool:
    return key.startswith(_ANON_PREFIX)


def _checkpoint_key(key: str) -> str:
    return key + _CHECKPOINT_SUFFIX


def _is_internal(key: str) -> bool:
    """Anonymous (one-shot) entries and checkpoints: stored, but not conversations."""
    return _is_anonymous(key) or key.endswith(_CHECKPOINT_SUFFIX)
