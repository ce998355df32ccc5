"""Warm-ups: a draft of a conversation's next turn prefilled while its user types.

A warm-up is a ``Turn`` with ``warm`` set: its prompt is prefilled onto the conversation's cache,
in chunks, nothing is generated and nothing committed; the cache is checked in holding the
prompt, so that the next turn reuses whatever of the draft its prompt still begins with (the
store trims to the common prefix). Its one event is ``Warmed`` (or ``Failed``).

Warm-ups run below turns. Between two chunks, a turn waiting in the queue comes first: the
warm-up checks in what it has prefilled and is set aside (``_deferred``), to resume when no
turn waits; in batch mode warm-ups wait for the batch to empty. A stopping engine sets them
aside too, and fails them (``ShuttingDownError``) with the rest of its queue. A warm-up that is cancelled
(a newer warm-up or a turn of the same conversation supersedes it, see ``turns.py``) ends at
the next chunk with what it prefilled. Its cache counts against the memory budget as a turn's
does (the lease reserves what the prompt takes).

``WarmUpMode`` is the engine's part for them (a base class of ``Engine``, kept here).
"""

from __future__ import annotations

import collections
import time

from .events import Failed, Turn, Warmed


class WarmUpMode:
    """Runs warm-ups on the engine thread. Uses the engine's runtime, store, queue, counters
    and active count."""

    _deferred: collections.deque[Turn]  # warm-ups set aside for turns, oldest first
    _warm_cached: dict[int, int]  # id(turn) -> tokens cached when it first started
    _warm_held: dict[int, int]  # id(turn) -> tokens prefilled when it was set aside

    def _turn_queued(self) -> bool:
        """Whether a turn (not a warm-up) waits in the queue."""
        return any(isinstance(item, Turn) and not item.warm for item in list(self._queue.queue))

    def _run_warm(self, turn: Turn) -> None:
        rt = self.runtime
        prompt = turn.prompt.ids
        key = turn.plan.conversation_id or None
        held = 0
        try:
            if not turn.cancelled.is_set():
                rt.ensure_loaded()
                lease = self.store.lease(key, prompt, reserve_bytes=rt.kv_nbytes(len(prompt)))
                cache = lease.lookup.cache if lease.lookup.cache is not None else rt.make_cache()
                held = lease.lookup.cached_tokens
                self._warm_cached.setdefault(id(turn), held)
                try:
                    while (held < len(prompt) and not turn.cancelled.is_set() and not self._turn_queued()
                           and not self._stopping.is_set()):
                        fed = rt.prefill(prompt[held : held + rt.prefill_step], cache, turn.cancelled)
                        held += fed
                        self.counters.tokens_prefilled += fed  # the status shows it as it goes
                except BaseException:
                    lease.release()
                    raise
                lease.checkin(prompt[:held], cache)
                self._refresh_snapshot()
        except BaseException as exc:  # noqa: BLE001 - the warm-up's client gets every failure
            self._end_warm(turn, Failed(exc))
            return
        if held < len(prompt) and not turn.cancelled.is_set():
            self._warm_held[id(turn)] = held
            self._deferred.append(turn)  # a turn waits: it goes first, this one resumes after
            return
        cached = self._warm_cached.get(id(turn), held)
        self._end_warm(turn, Warmed(len(prompt), cached, max(0, held - cached), held < len(prompt)))

    def _superseded(self, turn: Turn) -> Warmed:
        """The outcome of a warm-up set aside that will not resume."""
        cached, held = self._warm_cached.get(id(turn), 0), self._warm_held.get(id(turn), 0)
        return Warmed(len(turn.prompt.ids), cached, max(0, held - cached), True)

    def _end_warm(self, turn: Turn, event: Warmed | Failed) -> None:
        self._warm_held.pop(id(turn), None)
        self._warm_cached.pop(id(turn), None)
        self._last_turn_at = time.monotonic()
        with self._active_lock:
            self._active -= 1
        turn.events.put(event)
