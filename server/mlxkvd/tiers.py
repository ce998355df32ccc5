"""Where the cache store's entries live: a memory tier bounded by bytes, over a disk tier.

``Tiers`` belongs to ``store.CacheStore``, which decides what a turn is handed; this module
decides where each entry is kept and for how long. Pure bookkeeping like the store: called from
the engine thread, every cache object handled through the store's ``ops``. The disk tier is
``disk_tier.DiskTier`` (file naming, atomic writes, integrity checks: its own rules).

Rules:

- Memory is bounded by allocated bytes (``ops.nbytes``), in LRU order (lru-dict); what does not
  fit spills to the disk tier, which is bounded by file bytes, also in LRU order. The caches
  checked out count too: each lease reserves what its cache may grow to (``reserve``), so
  resident KV (stored plus in flight) stays within the budget during a turn as well.
- Write-behind. ``persist_next`` (called by the engine when it is idle, off the path of any turn)
  writes the least recently used memory entry not yet on disk and keeps it resident, so a daemon
  killed with SIGKILL between turns still finds every conversation's history on disk. Where the
  cache can be copied for it (``ops.snapshot``) and the copy fits the memory budget (it is
  reserved until the write ends), the file is written by a thread while turns go on
  (``DiskTier.start_write``); a later ``persist_next`` puts it in place. A key's
  disk file is only replaced by a newer one, never removed by ``take`` or ``put``: until it is
  replaced it holds an older, still valid prefix of the conversation.
- One-shot entries are kept in memory only, at most ``max_anonymous`` of them.
- ``ttl_s`` forgets entries, in both tiers, unused for that long (``expire``).
- Nothing is served from a disk file that fails its checks (see ``disk_tier``). Disk errors are
  logged and the entry is dropped; they are never raised.
- Every entry that leaves on the tiers' own initiative (evicted, expired, dropped by the disk
  tier) is reported through ``on_drop(key, reason)``, so that the store can say why a key is
  gone; one-shot entries pushed out of memory are not. Entries the store removes itself
  (``take``, ``put``, ``remove``, ``clear``) are not either.
- ``entries`` (the store's ``EntryIndex``) records where each key's entry is seen: the resident
  one if it is in both tiers. Every change of where an entry lives goes through ``_place`` or
  ``_relocate``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lru

from .disk_tier import DiskEntry, DiskTier, open_disk_dir
from .prefix_index import EntryIndex

__all__ = ["MemoryEntry", "Tiers"]

log = logging.getLogger(__name__)

# lru-dict needs a capacity; ours are bounded by bytes, not by count.
_UNBOUNDED = 2**31 - 1
# The reservation of the copy that a write in the background holds (lease ids are positive).
_WRITE_LEASE = -1


@dataclass
class MemoryEntry:
    """A resident cache: replaced, never changed in place (``EntryIndex.get`` readers), but for
    ``last_used`` and the write-behind flags."""

    tokens: tuple[int, ...]
    cache: Any
    nbytes: int
    trimmable: bool
    last_used: float
    one_shot: bool  # memory only, not a conversation (see max_anonymous)
    persisted: bool = False  # the disk tier holds these exact tokens for this key
    write_attempted: bool = False


@dataclass
class _TierStats:
    hits: int = 0
    misses: int = 0


class Tiers:
    """A memory tier of at most ``max_bytes`` (0 keeps nothing) over an optional disk tier of
    at most ``max_disk_bytes`` in ``disk_dir`` (0 or no directory: none), whose files made with
    another ``fingerprint`` are removed at startup. ``entries`` is kept in step with both."""

    def __init__(
        self,
        ops,
        entries: EntryIndex,
        *,
        fingerprint: str,
        max_bytes: int,
        disk_dir: Path | None,
        max_disk_bytes: int,
        ttl_s: float | None,
        clock: Callable[[], float],
        max_anonymous: int,
        on_drop: Callable[[str, str], None],
    ):
        self.entries = entries
        self._ops = ops
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_anonymous = max_anonymous
        self._on_drop = on_drop
        # lru.LRU rather than OrderedDict: it is the LRU order (keys() is most recent first,
        # peek_last_item() is the eviction victim). Its eviction callback is not used: the
        # budget is in bytes, not entries, so eviction is explicit in _enforce_memory_budget.
        self._mem: lru.LRU = lru.LRU(_UNBOUNDED)
        self._mem_bytes = 0
        self._anonymous = 0  # one-shot entries in memory
        self._leases: dict[int, int] = {}  # bytes each checked-out cache may grow to
        self._oldest_use = math.inf  # no entry was used before this (see expiry_due)
        self._mem_stats = _TierStats()
        self._disk_stats = _TierStats()
        self._disk: DiskTier | None = None
        self._writing: MemoryEntry | None = None  # the entry a write in the background copied
        directory = open_disk_dir(disk_dir) if disk_dir and max_disk_bytes > 0 else None
        if directory is not None:
            self._disk = DiskTier(ops, directory, fingerprint=fingerprint,
                                  max_bytes=max_disk_bytes, clock=clock,
                                  on_drop=self._dropped_from_disk, on_written=self._written_behind)
            for key, dentry in self._disk.items():
                self._relocate(key)
                self._oldest_use = min(self._oldest_use, dentry.last_used)
            self.entries.refresh()  # now, rather than in the first turn that searches

    # ------------------------------------------------------------------------ entries

    def put(self, key: str, tokens: tuple[int, ...], cache, *, one_shot: bool) -> None:
        """Make ``cache`` (holding exactly ``tokens``) ``key``'s resident entry, most recently
        used; one larger than the whole budget goes straight to disk. No tokens: the resident
        entry is only dropped."""
        # The key's disk file (if any) stays until persist_next replaces it: a crash before
        # then still leaves a valid prefix of this conversation on disk.
        self._pop_memory(key)
        if not tokens:
            return
        entry = MemoryEntry(tokens, cache, self._ops.nbytes(cache), self._ops.can_trim(cache),
                            self._clock(), one_shot)
        if entry.nbytes > self._max_bytes:
            self._evict(key, entry)
            return
        self._place(key, entry)
        self._enforce_memory_budget()

    def take(self, key: str) -> tuple[str, MemoryEntry | DiskEntry] | None:
        """``key``'s entry as ``(tier, entry)``: the resident one, removed from memory (its cache
        is the caller's now), else its disk file's, marked used (``load`` reads it)."""
        entry = self._pop_memory(key)
        if entry is not None:
            return "memory", entry
        dentry = self._disk.get(key) if self._disk is not None else None
        return ("disk", dentry) if dentry is not None else None

    def touch(self, key: str) -> MemoryEntry:
        """``key``'s resident entry, marked most recently used."""
        entry = self._mem[key]
        entry.last_used = self._clock()
        return entry

    def load(self, key: str, n: int) -> Any | None:
        """A fresh cache holding the first ``n`` tokens of ``key``'s disk file, or None (see
        ``DiskTier.load``). The file stays: a valid prefix until replaced."""
        return self._disk.load(key, n) if self._disk is not None else None

    def remove(self, key: str) -> bool:
        """Forget ``key`` in both tiers. True if it was in either."""
        in_memory = self._pop_memory(key) is not None
        on_disk = self._disk is not None and self._disk.remove(key)
        self._relocate(key)
        return in_memory or on_disk

    def clear(self) -> list[str]:
        """Drop everything in memory; returns the keys dropped, most recently used first. A
        write in the background ends first (a store reopened on the directory next must not
        find its file half written)."""
        self._settle()
        keys = self._mem.keys()
        for key in keys:
            self._pop_memory(key)
        return keys

    def keys(self) -> list[str]:
        """Keys in either tier (each once), most recently used first within a tier, memory
        first."""
        on_disk = self._disk.keys() if self._disk is not None else []
        return list(dict.fromkeys([*self._mem.keys(), *on_disk]))  # a key can be in both

    def resident(self, key: str):
        entry = self._mem.get(key)
        return None if entry is None else entry.cache

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
        # Entries are replaced, never changed in place (EntryIndex.get reads them from any thread).
        self._pop_memory(key)
        self._place(key, dataclasses.replace(entry, nbytes=self._ops.nbytes(entry.cache)))
        return True

    # ------------------------------------------------------------------- reservations

    @property
    def _reserved(self) -> int:
        return sum(self._leases.values())

    def reserved(self, lease: int) -> int:
        """The bytes ``lease`` holds."""
        return self._leases.get(lease, 0)

    def can_reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the memory budget beside the caches checked out (resident
        entries can always be evicted for them)."""
        self._settle_if_done()  # a finished write's copy holds no memory any more
        return self._reserved + nbytes <= self._max_bytes

    def reserve(self, lease: int, nbytes: int) -> None:
        """The cache out under ``lease`` may grow to ``nbytes``: evict until that fits."""
        self._settle_if_done()
        self._leases[lease] = nbytes
        self._enforce_memory_budget()

    def release(self, lease: int) -> None:
        """The cache out under ``lease`` is back, or gone: its reservation ends."""
        self._leases.pop(lease, None)

    # --------------------------------------------------------------------- disk writes

    def persist_next(self) -> bool:
        """Write the least recently used memory entry not on disk yet, keeping it resident: in
        the background where it can (see the module doc), else at once. False when nothing was
        done: nothing to write (or no disk tier), or a write in the background still runs."""
        if self.writing:
            return self._settle_if_done()
        return self._persist_one(background=True) is not None

    @property
    def writing(self) -> bool:
        """Whether a write runs in the background (``persist_next`` ends it once done)."""
        return self._disk is not None and self._disk.writing is not None

    def flush(self) -> int:
        """Write every memory entry not on disk yet; returns how many were written (failed
        writes are not counted)."""
        self._settle()
        written = 0
        while (ok := self._persist_one()) is not None:
            written += ok
        return written

    def spill(self) -> int:
        """Move every memory entry to the disk tier, writing those not on disk yet. One-shot
        entries are dropped; one that cannot be written stays in memory. Returns how many
        entries left memory."""
        if self._disk is None:
            return 0
        moved = 0
        for key, entry in list(reversed(self._mem.items())):  # least recently used first
            if entry.one_shot or self._on_disk(key, entry):
                self._pop_memory(key)
                moved += 1
        return moved

    def _persist_one(self, background: bool = False) -> bool | None:
        """None if there was nothing to write, else whether the write succeeded (or, in the
        background, was started)."""
        if self._disk is None:
            return None
        # Least recently used first, so that the disk tier's LRU order (a write makes a file the
        # most recent) ends up matching memory's, and its budget evicts the oldest conversation.
        # items() is most recent first and does not touch the order.
        for key, entry in reversed(self._mem.items()):
            if entry.write_attempted or entry.one_shot:
                continue
            # A failed write (disk full, too large for the budget) is not retried on every
            # idle moment; the next put of the key makes it a candidate again.
            entry.write_attempted = True
            if background and self._mem_bytes + self._reserved + entry.nbytes <= self._max_bytes:
                if self._disk.start_write(key, entry.tokens, entry.cache, last_used=entry.last_used):
                    self._writing = entry
                    self._leases[_WRITE_LEASE] = entry.nbytes
                    return True
            entry.persisted = self._write(key, entry)
            return entry.persisted
        return None

    def _written_behind(self, key: str, kept: bool) -> None:
        """The disk tier settled a write started by ``_persist_one``."""
        entry, self._writing = self._writing, None
        self._leases.pop(_WRITE_LEASE, None)
        if entry is not None:
            entry.persisted = kept  # a resident entry replaced since is not the one written
            self._oldest_use = min(self._oldest_use, entry.last_used)
        self._relocate(key)

    def _settle(self) -> None:
        """End a write in the background, if one runs (waiting for it)."""
        if self._disk is not None:
            self._disk.settle()

    def _settle_if_done(self) -> bool:
        """End a write in the background that has finished (never waits). True if it did."""
        if not self.writing or not self._disk.write_done():
            return False
        self._disk.settle()
        return True

    # ------------------------------------------------------------------------ expiry

    def expire(self) -> int:
        """Forget entries (both tiers) unused for ``ttl_s`` seconds. Returns how many."""
        if self._ttl_s is None:
            return 0
        deadline = self._clock() - self._ttl_s
        count = 0
        for key, entry in list(self._mem.items()):
            if entry.last_used < deadline:
                self._pop_memory(key)
                self._on_drop(key, "expired")
                count += 1
        for key in self._disk.expire(deadline) if self._disk is not None else []:
            self._relocate(key)
            self._on_drop(key, "expired")
            count += 1
        uses = [e.last_used for _, e in self._mem.items()]
        uses += [d.last_used for _, d in (self._disk.items() if self._disk is not None else [])]
        self._oldest_use = min(uses, default=math.inf)
        if count:
            log.info("expired %d cache entries unused for %.0f s", count, self._ttl_s)
        return count

    def expiry_due(self) -> bool:
        """Whether ``expire`` can find anything: nothing expired before the least recently used
        entry did, so this is an O(1) test per turn instead of a pass over every entry."""
        return self._ttl_s is not None and self._clock() - self._ttl_s > self._oldest_use

    def set_ttl(self, ttl_s: float | None) -> None:
        """Change the idle lifetime of entries (None: forever)."""
        self._ttl_s = ttl_s

    def set_memory_budget(self, max_bytes: int) -> None:
        """Change the memory budget, evicting at once if it shrank."""
        self._max_bytes = max_bytes
        self._enforce_memory_budget()

    # ------------------------------------------------------------------------- stats

    def count(self, tier: str) -> None:
        """A checkout found its cache in ``tier`` ("memory" | "disk" | "none")."""
        if tier == "memory":
            self._mem_stats.hits += 1
        else:
            self._mem_stats.misses += 1
            if self._disk is not None:
                if tier == "disk":
                    self._disk_stats.hits += 1
                else:
                    self._disk_stats.misses += 1

    def stats(self) -> dict:
        """Counters of each tier. O(1); safe from any thread."""
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
        }

    # ------------------------------------------------------------- where entries live

    def _place(self, key: str, entry: MemoryEntry) -> None:
        """Make ``entry`` the resident entry of ``key`` (not there yet), most recently used."""
        self._mem[key] = entry
        self._mem_bytes += entry.nbytes
        self._anonymous += entry.one_shot
        self.entries.set(key, "memory", entry)
        self._oldest_use = min(self._oldest_use, entry.last_used)

    def _pop_memory(self, key: str) -> MemoryEntry | None:
        entry = self._mem.pop(key, None)
        if entry is not None:
            self._mem_bytes -= entry.nbytes
            self._anonymous -= entry.one_shot
            self._relocate(key)
        return entry

    def _relocate(self, key: str) -> None:
        """``key`` left memory, or its disk file changed: record where it is now seen."""
        if key in self._mem:  # the resident entry is the one seen; _place recorded it
            return
        dentry = self._disk.peek(key) if self._disk is not None else None
        if dentry is None:
            self.entries.discard(key)
        else:
            self.entries.set(key, "disk", dentry)

    def _dropped_from_disk(self, key: str, reason: str) -> None:
        """The disk tier dropped ``key``'s file by itself (evicted, corrupt, another model)."""
        self._on_drop(key, reason)
        self._relocate(key)

    def _enforce_memory_budget(self) -> None:
        while self._mem_bytes + self._reserved > self._max_bytes and len(self._mem):
            key, _ = self._mem.peek_last_item()
            self._evict(key, self._pop_memory(key))
        if self._anonymous > self._max_anonymous:
            one_shot = [k for k, e in self._mem.items() if e.one_shot]  # most recent first
            for key in one_shot[self._max_anonymous :]:
                self._pop_memory(key)

    def _evict(self, key: str, entry: MemoryEntry) -> None:
        """Move an entry out of memory: to disk if it can go there, else drop it."""
        if not self._on_disk(key, entry) and not entry.one_shot:
            self._on_drop(key, "evicted")

    def _on_disk(self, key: str, entry: MemoryEntry) -> bool:
        """Make sure the disk tier holds ``entry`` (writing it if need be); False if it cannot
        (no disk tier, a failed write, a one-shot entry)."""
        if self._disk is None or entry.one_shot:
            return False
        self._settle()  # it may be writing this very entry
        if entry.persisted and key in self._disk:
            return True
        return self._write(key, entry)

    def _write(self, key: str, entry: MemoryEntry) -> bool:
        ok = self._disk.write(key, entry.tokens, entry.cache, last_used=entry.last_used)
        self._oldest_use = min(self._oldest_use, entry.last_used)
        self._relocate(key)
        return ok
