"""The engine: the one thread that runs MLX.

gRPC handler threads submit a ``Turn`` (rendered and tokenized by the turns layer) and read
its event queue; they never touch the model or the caches. Each turn checks out the longest
cached prefix of its prompt from the store, prefills the rest, streams tokens, and checks the
cache back in. A turn whose client went away stops within one prefill chunk or one decode step.

Idle time is used in stages (``idle.IdleStages``): room for the next turn, its shapes
planned, caches written behind, expired, the weights unloaded.

Nothing submitted is ever left waiting: a turn or task that arrives while the engine stops,
or after its thread died, fails with ``ShuttingDownError``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import speculative
from .drafting import DraftModel
from .batch import BatchMode
from .conversations import ConversationRegistry
from .events import Failed, Turn
from .idle import DEFAULT_WRITE_BEHIND_DELAY_S, IdleStages
from .running import Counters, RunningTurn
from .errors import ShuttingDownError, TurnCancelledError
from .kvcache import MlxCacheOps
from .runtime import ModelRuntime
from .store import CacheStore
from .warmup import WarmUpMode

log = logging.getLogger(__name__)

# Turns decoded together at most (1: one at a time).
DEFAULT_MAX_BATCH = 8


@dataclass
class _Task:
    """A function to run on the engine thread; ``future`` (if any) gets its result.
    ``exclusive``: only once no turn runs (a batch in progress empties first)."""

    fn: Callable[[], Any]
    future: Future | None = None
    exclusive: bool = False


class Engine(BatchMode, WarmUpMode, IdleStages):
    """Owns the model runtime and the cache store; runs a lone turn serially, concurrent
    turns as rows of a batch (batch mode: ``batch.BatchMode``), warm-ups below turns
    (``warmup.WarmUpMode``), idle duties between them (``idle.IdleStages``)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        store: CacheStore,
        registry: ConversationRegistry,
        *,
        write_behind_delay_s: float = DEFAULT_WRITE_BEHIND_DELAY_S,
        idle_unload_s: float = 0.0,
        cache_ttl_s: float = 0.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        draft: DraftModel | None = None,
    ):
        self.runtime = runtime
        self.store = store
        self.draft = draft  # --draft-model: its caches get a share of the memory budget
        if draft is not None:
            self._set_memory_budget(store.memory_budget)
        self.registry = registry
        self.write_behind_delay_s = write_behind_delay_s
        self.idle_unload_s = idle_unload_s
        self.cache_ttl_s = cache_ttl_s
        self._ops = MlxCacheOps()
        self._last_turn_at = self._last_expiry_at = time.monotonic()
        self._room_for: str | None = None  # the conversation whose cache gets room next
        self._warm_for: str | None = None  # the conversation whose next shapes get planned
        self.max_batch = max_batch
        self._batchable = runtime.can_batch
        if max_batch > 1 and not self._batchable:
            log.info("this model's caches cannot be batched: concurrent turns run one at a time")
        self._batch = None  # the rows decoding together, in batch mode
        self._waiting: collections.deque[Turn] = collections.deque()  # turns not admitted yet
        self._deferred: collections.deque[Turn] = collections.deque()  # warm-ups set aside
        self._exclusive: collections.deque[_Task] = collections.deque()  # waiting for a batch to end
        self._warm_cached: dict[int, int] = {}
        self._warm_held: dict[int, int] = {}
        self._stopping_seen = False
        self.counters = Counters()
        self._queue: "queue.Queue[Turn | _Task | None]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlxkv-engine", daemon=True)
        # Held while deciding to queue, and while stopping: nothing lands after the sentinel.
        self._accepting = threading.Lock()
        self._stopping = threading.Event()
        self._died = False
        self._active = 0
        self._active_lock = threading.Lock()
        self._current: Turn | None = None
        self._stats: dict[str, Any] = store.stats()
        args = getattr(runtime.model, "args", None)
        self._vocab_size = int(getattr(args, "vocab_size", 0) or len(runtime.tokenizer.vocab))

    # -- handler-thread side --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (the daemon must exit and be restarted)."""
        return not self._died

    def submit(self, turn: Turn) -> None:
        with self._accepting:
            self._refuse_if_stopped()
            with self._active_lock:
                self._active += 1
            self._queue.put(turn)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the engine thread (anything touching the store) and return its result;
        waits for the turn in flight to end first."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        self._enqueue(_Task(fn, future))
        return future.result(timeout=timeout)

    def call_exclusive(self, fn: Callable[[], Any]) -> Any:
        """``call``, once no turn is running: in batch mode, after the batch has emptied (the
        turns queued before it run first, later queued work waits for it)."""
        future: Future = Future()
        self._enqueue(_Task(fn, future, exclusive=True))
        return future.result()

    def switch_model(self, load: Callable[[], ModelRuntime]) -> int:
        """Make the runtime ``load`` returns the resident one, on the engine thread with no
        turn running: the resident model's caches go to the disk tier (under its fingerprint)
        and its weights leave memory first; warm-ups set aside end as superseded. If ``load``
        raises, the previous model is loaded back and the error raised. Returns how many
        caches moved to disk."""
        return self.call_exclusive(lambda: self._switch(load))

    def unload_model(self) -> tuple[str, int]:
        """Free the resident model's memory (its caches go to disk first); the next turn loads
        it again. Returns its name ("" if it was not resident) and the caches moved."""

        def unload() -> tuple[str, int]:
            if not self.runtime.loaded:
                return "", 0
            return self.runtime.name, self._unload("asked to")

        return self.call_exclusive(unload)

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the engine thread soon, without waiting for it (errors are logged)."""
        self._enqueue(_Task(fn))

    def _enqueue(self, task: _Task) -> None:
        with self._accepting:
            self._refuse_if_stopped()
            self._queue.put(task)

    def _refuse_if_stopped(self) -> None:
        if self._stopping.is_set() or not self.alive:
            raise ShuttingDownError("the daemon is shutting down")

    @property
    def active_requests(self) -> int:
        return self._active

    def store_stats(self) -> dict[str, Any]:
        """The store's statistics as of the last change the engine made (never blocks)."""
        return self._stats

    def cache_info(self, conversation_id: str) -> tuple[str, tuple[int, ...], int] | None:
        """Where a conversation's cache is ("memory" or "disk"), the tokens it holds and its
        bytes; None if it has none (never blocks)."""
        return self.store.entry_info(conversation_id)

    def set_idle_unload(self, idle_unload_s: float) -> None:
        """Change the idle unload delay (SIGHUP); takes effect at once, even while idle."""
        self.idle_unload_s = idle_unload_s
        self.post(lambda: None)  # wakes the idle wait so that it re-arms its timer

    def set_cache_ttl(self, ttl_s: float) -> None:
        """Change how long unused caches live (0: forever); takes effect at once."""
        self.cache_ttl_s = ttl_s
        self.post(lambda: self.store.set_ttl(ttl_s or None))

    def set_memory_budget(self, max_bytes: int) -> None:
        """Change the memory budget of resident caches (the draft model's share included);
        evicts at once if it shrank."""
        self.post(lambda: self._set_memory_budget(max_bytes))

    def _set_memory_budget(self, max_bytes: int) -> None:
        """Split ``max_bytes`` between the model's caches and the draft model's."""
        draft = self.draft.share(max_bytes, self.runtime) if self.draft is not None else 0
        if self.draft is not None:
            self.draft.set_memory_budget(draft)
        self.store.set_memory_budget(max_bytes - draft)

    def delete_cache(self, conversation_id: str) -> bool:
        """Remove a conversation's cache from every tier; waits for the running turn."""
        return bool(self.call(lambda: self.store.delete(conversation_id)))

    def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new turns, let queued ones finish for ``grace_s``, cancel the rest, flush."""
        with self._accepting:
            if self._stopping.is_set():
                return
            self._stopping.set()
            self._queue.put(None)
        if not self._thread.ident:
            return
        self._thread.join(grace_s)
        if self._thread.is_alive():
            log.warning("cancelling turns still running after %.0f s", grace_s)
            for item in list(self._queue.queue):
                if isinstance(item, Turn):
                    item.cancel()
            current = self._current
            if current is not None:
                current.cancel()
            for turn in list(self._waiting):
                turn.cancel()
            batch = self._batch
            for run in batch.runs() if batch is not None else ():
                run.turn.cancel()
            self._thread.join()

    # -- engine-thread side ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - whatever it was, nobody may wait on us now
            log.critical("the engine thread died", exc_info=True)
            self._died = True
        finally:
            self._fail_batch()  # rows and waiting turns of a batch it died in
            self._drain()
        try:
            flushed = self.store.flush()
            log.info("flushed %d cache entries to disk", flushed)
        except Exception:  # noqa: BLE001 - shutdown must go on
            log.exception("flushing caches at shutdown failed")

    def _serve(self) -> None:
        """Serial turns while one runs alone; once another turn arrives, batched turns until
        the batch empties (see ``_run_serial`` and ``_run_batched``)."""
        while True:
            if self._batch is not None:
                if not self._run_batched():
                    return
                continue
            item = self._next_item()
            if item is None:
                return
            if isinstance(item, Turn) and item.warm:
                self._run_warm(item)
            elif isinstance(item, Turn):
                self._run_serial(item)
                self._refresh_snapshot()
            else:
                self._run_task(item)

    def _run_task(self, task: _Task) -> None:
        if task.exclusive and self._batch is not None:
            self._exclusive.append(task)
            return
        try:
            result = task.fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller, or logged
            if task.future is None:
                log.exception("an engine task failed")
            else:
                task.future.set_exception(exc)
            return
        finally:
            self._refresh_snapshot()  # a status right after the task sees its effect
        if task.future is not None:
            task.future.set_result(result)

    def _drain(self) -> None:
        """Fail everything still queued: the engine takes no more work."""
        with self._accepting:
            self._stopping.set()
            while self._deferred:
                self._end_warm(self._deferred.popleft(), Failed(ShuttingDownError("the daemon is shutting down")))
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                error = ShuttingDownError("the daemon is shutting down")
                if isinstance(item, Turn):
                    with self._active_lock:
                        self._active -= 1
                    if not item.one_shot:
                        self.registry.abandon_turn(item.plan)
                    item.events.put(Failed(error))
                elif isinstance(item, _Task) and item.future is not None:
                    item.future.set_exception(error)

    def _switch(self, load: Callable[[], ModelRuntime]) -> int:
        while self._deferred:  # their prompts are the old tokenizer's
            turn = self._deferred.popleft()
            self._end_warm(turn, self._superseded(turn))
        old = self.runtime
        moved = self._unload("switching models") if old.loaded else 0
        self.store.clear()  # what could not be written to disk
        try:
            new = load()
        except BaseException:
            log.error("loading the new model failed; loading %s back", old.name)
            old.ensure_loaded()
            raise
        self.runtime = new
        self.store = self.store.reopen(new.fingerprint)
        self._batchable = new.can_batch
        if self.max_batch > 1 and not self._batchable:
            log.info("this model's caches cannot be batched: concurrent turns run one at a time")
        args = getattr(new.model, "args", None)
        self._vocab_size = int(getattr(args, "vocab_size", 0) or len(new.tokenizer.vocab))
        self._last_turn_at = time.monotonic()  # the idle delays count from the switch
        return moved

    def _refresh_snapshot(self) -> None:
        self._stats = self.store.stats()

    # -- turns --------------------------------------------------------------------------

    def _new_run(self, turn: Turn) -> RunningTurn:
        return RunningTurn(turn, self.runtime, self.store, self.registry, self.counters, self._vocab_size)

    def _turn_ended(self, run: RunningTurn) -> None:
        self._last_turn_at = time.monotonic()
        with self._active_lock:
            self._active -= 1
        for forgotten in self.registry.pop_forgotten():
            self.store.delete(forgotten)
        self._refresh_snapshot()  # a batch row's end too, while the other rows go on

    def _complete(self, run: RunningTurn, cache: Any) -> None:
        try:
            self._room_for = run.complete(cache)
        except BaseException as exc:  # noqa: BLE001 - e.g. deleted during the turn: its own failure
            run.fail(exc)
        self._turn_ended(run)

    def _fail(self, run: RunningTurn, exc: BaseException) -> None:
        run.fail(exc)
        self._turn_ended(run)

    def _run_serial(self, turn: Turn) -> None:
        """One turn alone: chunked prefill, then the first token from one evaluation (see
        ``ModelRuntime.generate``). Between prefill chunks and decode steps it looks for a
        turn waiting: if batching is possible, the turn joins a batch (``_hand_over``)."""
        run = self._new_run(turn)
        rt = self.runtime
        self._current = turn
        try:
            if turn.cancelled.is_set():
                raise TurnCancelledError("cancelled before it started")
            if not rt.loaded:
                rt.ensure_loaded()
            run.begin(self._refresh_snapshot)
            prompt, cache = run.prompt, run.cache
            try:
                # Prefill in chunks that a cancel can stop between, up to the last chunk, which
                # generate() feeds in the same forward pass that samples the first token.
                boundary = turn.boundary if turn.boundary is not None and turn.boundary >= run.held else None
                last_chunk = max(run.held, len(prompt) - rt.prefill_step)
                for target in sorted({last_chunk} | ({boundary} if boundary is not None else set())):
                    while run.held < target:
                        if self._turn_waiting():
                            self._hand_over(run, prompt[: run.held], prompt[run.held:])
                            return
                        run.held += rt.prefill(prompt[run.held : min(target, run.held + rt.prefill_step)],
                                               cache, turn.cancelled)
                        if turn.cancelled.is_set():
                            raise TurnCancelledError("the client cancelled the turn")
                    if target == boundary:
                        run.take_checkpoint(self._ops)
                        self._refresh_snapshot()
                # Closed on every exit, so that the cache holds every token generated.
                with contextlib.closing(self._tokens(run, prompt, cache)) as tokens:
                    handed_over = False
                    for token in tokens:
                        if turn.cancelled.is_set():
                            run.generated.append(token)
                            raise TurnCancelledError("the client cancelled the turn")
                        if run.on_token(token):
                            break
                        if self._turn_waiting():
                            handed_over = True
                            break
                if handed_over:
                    # The cache holds every generated token; the last one is fed again as
                    # the row's first input.
                    self._ops.trim(cache, 1)
                    self._hand_over(run, prompt + run.generated[:-1], run.generated[-1:])
                    return
            except TurnCancelledError:
                held = len(prompt) + len(run.generated) if run.generated else run.held
                run.cancelled(cache, held)
                raise
            self._complete(run, cache)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the handler
            self._fail(run, exc)
        finally:
            self._current = None

    def _tokens(self, run: RunningTurn, prompt: list[int], cache: Any) -> Iterator[int]:
        """The turn's generated tokens after the prompt's last chunk: one per step, or with
        speculative decoding several per step (``speculative.py``; greedy turns, trimmable
        caches): drafts from prompt lookup or from the draft model."""
        rt = self.runtime
        if run.speculates:
            run.lookup = self._drafter(run, prompt, cache)
        if run.lookup is not None:
            return speculative.generate(rt, prompt[run.held:], cache, run.lookup, max_tokens=run.max_tokens,
                                        sampler=run.sampler)
        return rt.generate(prompt[run.held:], cache, max_tokens=run.max_tokens, sampler=run.sampler)

    def _drafter(self, run: RunningTurn, prompt: list[int], cache: Any) -> speculative.Drafter | None:
        """The turn's drafter, or None (with one log line) when it cannot speculate."""
        why = None if speculative.can_speculate(cache) else "this model's cache cannot be trimmed"
        if why is None and run.turn.speculative == "draft":
            why = self.draft.misfit(self.runtime) if self.draft is not None else "there is no draft model"
            if why is None:
                return self.draft.proposer(run.key, prompt, run.max_tokens, run.turn.cancelled)
        if why is not None:
            log.info("conversation %r: no speculative decoding (%s), one token per step", run.key, why)
            return None
        return speculative.PromptLookup(prompt, room=run.max_tokens)

    def _turn_waiting(self) -> bool:
        """Whether a turn waits in the queue and could join this one in a batch."""
        return self.max_batch > 1 and self._queue.qsize() > 0 and self._batchable and self._turn_queued()
