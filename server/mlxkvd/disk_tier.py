"""The cache store's disk tier: one file per key in a directory, bounded by bytes in LRU order.

Bookkeeping over files, like the store it serves (``store.CacheStore``): no model, every cache
object handled through the store's ``ops`` adapter. One thread of its own at most: a write
started with ``start_write`` saves a copy of the cache while the caller goes on (a turn that
arrives meanwhile does not wait for the disk); ``settle`` ends it, and every change of the tier
settles first, so the index only changes on the caller's thread and in call order.

Rules:

- Files are named by sha256(fingerprint, key), written to a temporary name and renamed, and
  carry the exact tokens, the key, the model fingerprint, whether the cache can be trimmed and a
  checksum of these in their metadata.
- At start the directory is indexed from file metadata alone (no arrays), oldest first so that
  the most recently written file ends up most recently used. A leftover of an interrupted write,
  a file that is unreadable or corrupt, or whose metadata does not match its name is removed,
  never served.
- Files made with another model (another fingerprint) are kept for when that model is loaded
  again, never served: they count against the budget, in the same LRU order as this model's
  (by their time of writing).
- A file that fails its checks when loaded is removed; the store then reports the key as
  corrupt, never a wrong cache.
- The tier is bounded by file bytes, least recently used first; a file larger than the whole
  budget is not kept (it would push out everything else and still not fit).
- Disk errors are logged (one warning per kind of failure in a row) and the entry is dropped;
  they are never raised.
- Every entry that leaves on the tier's own initiative (evicted, corrupt) is
  reported through ``on_drop(key, reason)``, so that the store can say why a key is gone and keep
  its own index in step. Entries the store removes itself (``remove``, ``expire``) are not.

Integrity: the checksum is computed by ``ops.save`` and verified by ``ops.load`` (they are the
only ones that see the array bytes); it covers the metadata (hence the tokens) and the arrays.
``ops.load`` raises on mismatch; the tier additionally checks that the loaded metadata and token
count match its index.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lru

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
_TMP_PREFIX = ".tmp-"
_UNBOUNDED = 2**31 - 1  # lru-dict needs a capacity; ours is bounded by bytes, not by count


class CacheFileError(Exception):
    """A disk-tier file is unreadable, truncated, or fails its checksum."""


@dataclass
class DiskEntry:
    """A file of the disk tier, as its metadata describes it (no arrays loaded)."""

    tokens: tuple[int, ...]
    path: Path
    nbytes: int  # file size
    trimmable: bool
    last_used: float


def open_disk_dir(disk_dir: Path) -> Path | None:
    """``disk_dir``, created (0700) if need be, or None (logged) if it cannot be used."""
    try:
        disk_dir = Path(disk_dir)
        disk_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(disk_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", str(disk_dir))
    except OSError as e:
        log.warning("disk cache tier disabled: cannot use %s: %s", disk_dir, e)
        return None
    return disk_dir


@dataclass
class _Write:
    """One file being written: to ``tmp``, then put in place as ``path`` by ``DiskTier._commit``."""

    key: str
    tokens: tuple[int, ...]
    last_used: float
    path: Path
    tmp: Path
    metadata: dict[str, str]
    thread: threading.Thread | None = None
    error: BaseException | None = field(default=None, repr=False)

    def run(self, ops, cache) -> None:
        try:
            ops.save(self.tmp, cache, self.metadata)
        except Exception as e:  # noqa: BLE001 - reported by _commit, on the engine's thread
            self.error = e


class DiskTier:
    """Cache files in ``directory`` (see ``open_disk_dir``), at most ``max_bytes`` of them.

    The directory is indexed at construction. ``on_drop(key, reason)`` is called for every entry
    the tier drops by itself ("evicted", "cache file was corrupt").
    ``clock`` is the store's: ``last_used`` times are on it.
    """

    def __init__(
        self,
        ops,
        directory: Path,
        *,
        fingerprint: str,
        max_bytes: int,
        clock: Callable[[], float],
        on_drop: Callable[[str, str], None],
        on_written: Callable[[str, bool], None] = lambda key, kept: None,
    ):
        """``on_written(key, kept)``: a write started with ``start_write`` was settled."""
        self._ops = ops
        self._on_written = on_written
        self._dir = Path(directory)
        self._fingerprint = fingerprint
        self.max_bytes = max_bytes
        self._clock = clock
        self._on_drop = on_drop
        # LRU order (keys() most recent first, peek_last_item() the eviction victim); _files has
        # the same entries for reads that must not change that order.
        self._order: lru.LRU = lru.LRU(_UNBOUNDED)
        self._files: dict[str, DiskEntry] = {}
        # Other models' files: (last used, path, size), least recently used first.
        self._foreign: list[tuple[float, Path, int]] = []
        self.nbytes = 0  # file bytes, other models' included
        self._last_error = ""
        self._writing: _Write | None = None  # start_write's, until settle
        self._scan()

    # ---------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self) -> list[str]:
        """Most recently used first."""
        return self._order.keys()

    def items(self) -> list[tuple[str, DiskEntry]]:
        """Most recently used first; does not change the order."""
        return self._order.items()

    def peek(self, key: str) -> DiskEntry | None:
        """``key``'s entry without marking it used."""
        return self._files.get(key)

    def get(self, key: str) -> DiskEntry | None:
        """``key``'s entry, marked most recently used (a checkout looked at it)."""
        return self._order.get(key)

    # ---------------------------------------------------------------------------- changes

    def write(self, key: str, tokens: Sequence[int], cache, *, last_used: float) -> bool:
        """Write ``cache`` (holding exactly ``tokens``) as ``key``'s file, atomically, replacing
        the previous one. False (logged) on any failure, or if it is not kept (larger than the
        budget, or pushed out by it). A write in the background finishes first."""
        self.settle()
        write = _Write(key, tuple(tokens), last_used, *self._target(key, tokens, cache))
        write.run(self._ops, cache)
        return self._commit(write)

    def start_write(self, key: str, tokens: Sequence[int], cache, *, last_used: float) -> bool:
        """Begin ``write`` in a thread of its own, on a copy of ``cache`` taken now (later changes
        of ``cache`` do not reach the file); ``settle`` ends it. False (nothing started) where
        the cache cannot be copied so: the caller writes it with ``write``."""
        self.settle()
        snapshot = self._ops.snapshot(cache)
        if snapshot is None:
            return False
        write = _Write(key, tuple(tokens), last_used, *self._target(key, tokens, cache))
        write.thread = threading.Thread(target=write.run, args=(self._ops, snapshot),
                                        name="mlxkv-disk-write", daemon=True)
        self._writing = write
        write.thread.start()
        return True

    @property
    def writing(self) -> str | None:
        """The key whose file a thread is writing (``start_write``), until ``settle``."""
        return self._writing.key if self._writing is not None else None

    def write_done(self) -> bool:
        """Whether the write in the background (if any) has finished: ``settle`` will not wait."""
        return self._writing is None or not self._writing.thread.is_alive()

    def settle(self) -> None:
        """Wait for the write in the background, if any, make its file its key's (as ``write``
        does) and report it through ``on_written``."""
        write, self._writing = self._writing, None
        if write is None:
            return
        write.thread.join()
        self._on_written(write.key, self._commit(write))

    def _target(self, key: str, tokens: Sequence[int], cache) -> tuple[Path, Path, dict[str, str]]:
        """(the file's path, its temporary path, its metadata)."""
        path = self._path_for(key)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
        metadata = {
            "format": FORMAT_VERSION,
            "key": key,
            "fingerprint": self._fingerprint,
            "tokens": json.dumps(list(tokens)),
            "trimmable": "1" if self._ops.can_trim(cache) else "0",
        }
        metadata["index_checksum"] = _index_checksum(metadata)
        return path, tmp, metadata

    def _commit(self, write: "_Write") -> bool:
        """Put a written temporary file in place and in the index (or remove it, on failure)."""
        path = write.path
        try:
            if write.error is not None:
                raise write.error
            os.replace(write.tmp, path)
            size = path.stat().st_size
        except Exception as e:  # OSError mostly; MLX raises RuntimeError for I/O failures
            self._error("write", path, e)
            self._unlink(write.tmp)
            return False
        self._last_error = ""
        key = write.key
        self._pop(key)  # replaced in place by os.replace
        if size > self.max_bytes:  # would push out everything else and still not fit
            self._unlink(path)
            return False
        self._add(key, DiskEntry(write.tokens, path, size, write.metadata["trimmable"] == "1",
                                 write.last_used))
        self._enforce_budget()
        return key in self._files

    def load(self, key: str, n: int) -> Any | None:
        """A fresh cache object holding the first ``n`` tokens of ``key``'s file, which is
        marked used; or None if there is none or it cannot be trusted (logged, removed, reported
        as corrupt)."""
        if self.writing == key:
            self.settle()
        dentry = self._order.get(key)
        if dentry is None:
            return None
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
            self.remove(key)
            self._on_drop(key, "cache file was corrupt")
            return None
        dentry.last_used = self._clock()
        held = len(dentry.tokens)
        # Trimming keeps the allocation of all it held, so a large cut is copied instead: a long
        # file must not hold memory for tokens nobody uses.
        if held - n > n:
            return self._ops.copy_prefix(cache, n)
        if held > n:
            self._ops.trim(cache, held - n)
        return cache

    def remove(self, key: str) -> bool:
        """Delete ``key``'s file. True if there was one."""
        self.settle()
        dentry = self._pop(key)
        if dentry is None:
            return False
        self._unlink(dentry.path)
        return True

    def expire(self, deadline: float) -> list[str]:
        """Delete the files unused since before ``deadline``; returns their keys."""
        self.settle()
        gone = [key for key, dentry in self._order.items() if dentry.last_used < deadline]
        for key in gone:
            self.remove(key)
        return gone

    # ---------------------------------------------------------------------------- internals

    def _add(self, key: str, dentry: DiskEntry) -> None:
        self._order[key] = dentry
        self._files[key] = dentry
        self.nbytes += dentry.nbytes

    def _pop(self, key: str) -> DiskEntry | None:
        dentry = self._files.pop(key, None)
        if dentry is not None:
            self._order.pop(key, None)
            self.nbytes -= dentry.nbytes
        return dentry

    def _path_for(self, key: str) -> Path:
        name = hashlib.sha256(f"{self._fingerprint}\x00{key}".encode()).hexdigest()
        return self._dir / (name + self._ops.file_suffix)

    def _scan(self) -> None:
        """Build the index from file metadata (no arrays), oldest first so that the most
        recently written file ends up most recently used; remove what cannot be served."""
        found, foreign = [], []
        for path in self._dir.iterdir():
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
                foreign.append((st.st_mtime, path, st.st_size))
                continue
            if path != self._path_for(key) or not all(isinstance(t, int) for t in tokens):
                log.warning("disk cache: removing %s, its metadata does not match its name",
                            path.name)
                self._unlink(path)
                continue
            found.append((st.st_mtime, key, DiskEntry(tokens, path, st.st_size, trimmable, 0)))
        now_wall, now = time.time(), self._clock()
        for mtime, key, dentry in sorted(found, key=lambda f: f[0]):
            dentry.last_used = now - max(0.0, now_wall - mtime)
            self._add(key, dentry)
        self._foreign = [(now - max(0.0, now_wall - mtime), path, size)
                         for mtime, path, size in sorted(foreign, key=lambda f: f[0])]
        self.nbytes += sum(size for _, _, size in self._foreign)
        if found or foreign:
            log.info("disk cache: %d entries, %d bytes (%d files of other models kept)",
                     len(found), self.nbytes, len(foreign))
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Remove the least recently used files, this model's or other models', until the
        tier is within its budget."""
        while self.nbytes > self.max_bytes and (self._files or self._foreign):
            victim = self._order.peek_last_item() if self._files else None
            if self._foreign and (victim is None or self._foreign[0][0] <= victim[1].last_used):
                _, path, size = self._foreign.pop(0)
                self._unlink(path)
                self.nbytes -= size
                continue
            key = victim[0]
            self.remove(key)
            self._on_drop(key, "evicted")

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self._error("remove", path, e)

    def _error(self, action: str, path: Path, error: BaseException) -> None:
        # One clear line per kind of failure; a full or read-only disk would otherwise log the
        # same line on every eviction. A success in between re-arms the warning.
        kind = f"{action}:{type(error).__name__}:{getattr(error, 'errno', None)}"
        level = logging.DEBUG if kind == self._last_error else logging.WARNING
        log.log(level, "disk cache: cannot %s %s: %s; serving from memory only",
                action, path.name, error)
        self._last_error = kind


def _index_checksum(metadata: dict[str, str]) -> str:
    """sha256 of what the disk index trusts without loading arrays (``ops.load`` verifies the
    full checksum, arrays included, before anything is handed out)."""
    fields = [metadata[k] for k in ("format", "key", "fingerprint", "tokens", "trimmable")]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()
