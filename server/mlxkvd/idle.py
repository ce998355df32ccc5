"""The engine's idle stages: what its thread does while no turn runs.

Right after a turn, its conversation's cache gets room for the next turn's tokens
(``store.make_room``) and, on backends that plan attention per shape, after
``WARM_SHAPES_DELAY_S`` the next turn's likely shapes are planned
(``ModelRuntime.warm_shapes``). Once nothing has been queued for ``write_behind_delay_s``,
caches not yet on disk are written behind, one per look at the queue, so that a client that
sends its next turn right away never waits for a write; where the cache can be copied, a thread
writes the copy and a turn arriving meanwhile runs at once (see ``tiers``). Caches unused for ``cache_ttl_s`` are
forgotten; after ``idle_unload_s`` without a turn (0: never) the weights and the resident
caches leave memory, and the next turn loads them.

Each stage looks at the queue first: queued work always comes before an idle duty.
``IdleStages`` is the engine's part for them (a base class of ``Engine``, kept here).
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import _Task
    from .events import Turn

# The engine's lines.
log = logging.getLogger("mlxkvd.engine")

# How long the engine waits, idle, before writing caches behind to disk. Long enough for a
# script's or a benchmark's next turn, short against a person reading a reply.
DEFAULT_WRITE_BEHIND_DELAY_S = 1.0
# Room made, once a turn is over, in its conversation's cache for what the next turn adds (a
# user message, the re-rendered end of the reply; a tool result may need more).
NEXT_TURN_ROOM = 1024
# How long the engine waits, idle after a turn, before it plans the next turn's likely shapes:
# a request sent right after a turn (an agent's) must not wait for a warm-up pass.
WARM_SHAPES_DELAY_S = 0.2
# How often an idle engine looks for caches past their TTL.
TTL_CHECK_S = 1.0
# How often the idle engine looks whether a write-behind running in the background is done.
WRITE_POLL_S = 0.05
_EMPTY = object()


class IdleStages:
    """Picks the engine's next queued item, running the idle duties while there is none. Uses
    the engine's queue, runtime, store, draft model, delays and ``_refresh_snapshot``."""

    _queue: queue.Queue
    _room_for: str | None  # the conversation whose cache gets room next
    _warm_for: str | None  # the conversation whose next shapes get planned
    _last_turn_at: float
    _last_expiry_at: float

    def _next_item(self) -> "Turn | _Task | None":
        """The next queued item; while there is none, the idle stages (see the module doc).
        The delays count from the end of the last turn, not of the last task: a task must not
        keep postponing them."""
        while True:
            if self._exclusive:  # set aside by batch mode until the batch emptied
                return self._exclusive.popleft()
            if self._deferred:  # queued work first, else the oldest warm-up set aside
                item = self._wait(0)
                return item if item is not _EMPTY else self._deferred.popleft()
            if self._room_for is not None:
                item = self._wait(0)
                if item is not _EMPTY:
                    return item
                self._make_room()
            now = time.monotonic()
            idle = now - self._last_turn_at
            if self._warm_for is not None and idle >= WARM_SHAPES_DELAY_S:
                item = self._wait(0)
                if item is not _EMPTY:
                    return item
                self._warm_shapes()
                continue
            if self.cache_ttl_s > 0 and now - self._last_expiry_at >= TTL_CHECK_S:
                self._last_expiry_at = now
                self._expire()
            # How long to wait for work before the next idle duty is due (None: forever).
            waits = [TTL_CHECK_S] if self.cache_ttl_s > 0 else []
            if self._warm_for is not None:
                waits.append(WARM_SHAPES_DELAY_S - idle)
            if idle < self.write_behind_delay_s:
                waits.append(self.write_behind_delay_s - idle)
            else:
                item = self._wait(0)
                if item is not _EMPTY:
                    return item
                if self._write_behind():
                    continue
                if self.store.writing:  # a file is being written: put it in place once done
                    waits.append(WRITE_POLL_S)
                if self.idle_unload_s > 0 and self.runtime.loaded:
                    if idle >= self.idle_unload_s:
                        self._unload(f"idle for {self.idle_unload_s:.0f} s")
                        continue
                    waits.append(self.idle_unload_s - idle)
            item = self._wait(min(waits) if waits else None)
            if item is not _EMPTY:
                return item

    def _wait(self, timeout_s: float | None) -> Any:
        """The next queued item within ``timeout_s`` (None: however long), else ``_EMPTY``."""
        try:
            if timeout_s is not None and timeout_s <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return _EMPTY

    def _expire(self) -> None:
        try:
            if self.store.expire():
                self._refresh_snapshot()
        except Exception:  # noqa: BLE001 - an idle duty must never stop the engine
            log.exception("expiring caches failed")

    def _make_room(self) -> None:
        key, self._room_for = self._room_for, None
        self._warm_for = key if self.runtime.fixed_shapes else None
        started = time.perf_counter()
        try:
            if self.store.make_room(key, NEXT_TURN_ROOM):
                self._refresh_snapshot()
                log.debug("room for %d more tokens made in the cache of conversation %r in %.1f ms", NEXT_TURN_ROOM, key,
                          (time.perf_counter() - started) * 1e3)
        except Exception:  # noqa: BLE001 - an idle duty must never stop the engine
            log.exception("making room in a cache failed")

    def _warm_shapes(self) -> None:
        """The attention plans of the last turn's conversation's likely next shapes
        (``ModelRuntime.warm_shapes``), until work arrives."""
        key, self._warm_for = self._warm_for, None
        try:
            cache = self.store.resident(key)
            if cache is not None:
                self.runtime.warm_shapes(cache, stop=lambda: not self._queue.empty())
        except Exception:  # noqa: BLE001 - an idle duty must never stop the engine
            log.exception("planning the next turn's shapes failed")

    def _write_behind(self) -> bool:
        """Write one cache behind to the disk tier; False when there was nothing to write."""
        try:
            wrote = self.store.persist_next()
        except Exception:  # noqa: BLE001 - the disk tier must never stop the engine
            log.exception("writing a cache to the disk tier failed")
            return False
        if wrote:
            self._refresh_snapshot()
        return wrote

    def _unload(self, why: str) -> int:
        try:
            moved = self.store.spill()
        except Exception:  # noqa: BLE001 - unloading must not stop the engine
            log.exception("moving caches to the disk tier before unloading failed")
            moved = 0
        self._refresh_snapshot()  # the caches' new places, before the status says "not loaded"
        self.runtime.unload()
        if self.draft is not None:
            self.draft.unload()
        log.info("%s: model %s unloaded, %d caches moved to disk", why, self.runtime.name, moved)
        return moved
