"""The engine: the one thread that runs MLX.

gRPC handler threads submit a ``Turn`` (rendered and tokenized by the turns layer) and read
its event queue; they never touch the model or the caches. Each turn checks out the longest
cached prefix of its prompt from the store, prefills the rest, streams tokens, and checks the
cache back in. A turn whose client went away stops within one prefill chunk or one decode step.

Idle time is used in stages: right after a turn, its conversation's cache gets room for the
next turn's tokens (``store.make_room``); once nothing has been queued for ``write_behind_delay_s``,
caches not yet on disk are written behind, one per look at the queue, so a client that sends
its next turn right away never waits for a write; caches unused for ``cache_ttl_s`` are
forgotten; after ``idle_unload_s`` without a turn (0: never) the weights and the resident
caches leave memory, and the next turn loads them.

Nothing submitted is ever left waiting: a turn or task that arrives while the engine stops,
or after its thread died, fails with ``ShuttingDownError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .conversations import ConversationRegistry, TurnPlan
from .errors import MlxkvError, ShuttingDownError, TurnCancelledError
from .kvcache import MlxCacheOps
from .prompt import Prompt, template_tools
from .reply import Reply, ToolCall, ToolFormat
from .runtime import ModelRuntime, Sampling
from .store import CacheStore

log = logging.getLogger(__name__)

# How long the engine waits, idle, before writing caches behind to disk. Long enough for a
# script's or a benchmark's next turn, short against a person reading a reply.
DEFAULT_WRITE_BEHIND_DELAY_S = 1.0
# Room made, once a turn is over, in its conversation's cache for what the next turn adds (a
# user message, the re-rendered end of the reply; a tool result may need more).
NEXT_TURN_ROOM = 1024
# How often an idle engine looks for caches past their TTL.
TTL_CHECK_S = 1.0
_EMPTY = object()


@dataclass
class _Task:
    """A function to run on the engine thread; ``future`` (if any) gets its result."""

    fn: Callable[[], Any]
    future: Future | None = None


# Events a turn emits, in order: Started, then Text*, then Finished or Failed.
@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int
    cache_source: str
    cache_miss_reason: str
    tools_ignored: bool = False  # tools were sent, the chat template renders none of them


@dataclass(frozen=True)
class Text:
    text: str
    token_ids: tuple[int, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # completed with this text; their text is not in it


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "stop_string" | "tool_calls"
    text: str  # the reply without its tool calls' text
    tool_calls: tuple[ToolCall, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float
    queue_s: float
    revision: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Turn:
    """One submitted assistant turn. ``conversation_id`` empty means one-shot. ``boundary``:
    where the generation prompt starts, for a model whose caches need turn checkpoints."""

    plan: TurnPlan
    prompt: Prompt
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    one_shot: bool = False
    boundary: int | None = None
    tool_format: ToolFormat | None = None  # where tool calls are looked for (None: they are not)
    reply_prefix: str = ""  # the end of the prompt that is the reply's start (a forced call)
    tools_ignored: bool = False
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    # Tokens generated so far (engine thread), and how many there were at cancel().
    generated: int = 0
    generated_at_cancel: int | None = None

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
        self.cancelled.set()


@dataclass
class Counters:
    requests: int = 0
    requests_failed: int = 0
    tokens_saved: int = 0
    tokens_prefilled: int = 0
    tokens_generated: int = 0


class Engine:
    """Owns the model runtime and the cache store; runs turns one at a time."""

    def __init__(
        self,
        runtime: ModelRuntime,
        store: CacheStore,
        registry: ConversationRegistry,
        *,
        write_behind_delay_s: float = DEFAULT_WRITE_BEHIND_DELAY_S,
        idle_unload_s: float = 0.0,
        cache_ttl_s: float = 0.0,
    ):
        self.runtime = runtime
        self.store = store
        self.registry = registry
        self.write_behind_delay_s = write_behind_delay_s
        self.idle_unload_s = idle_unload_s
        self.cache_ttl_s = cache_ttl_s
        self._ops = MlxCacheOps()
        self._last_turn_at = self._last_expiry_at = time.monotonic()
        self._room_for: str | None = None  # the conversation whose cache gets room next
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
        """Change the memory budget of resident caches; evicts at once if it shrank."""
        self.post(lambda: self.store.set_memory_budget(max_bytes))

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
            self._thread.join()

    # -- engine-thread side ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - whatever it was, nobody may wait on us now
            log.critical("the engine thread died", exc_info=True)
            self._died = True
        finally:
            self._drain()
        try:
            flushed = self.store.flush()
            log.info("flushed %d cache entries to disk", flushed)
        except Exception:  # noqa: BLE001 - shutdown must go on
            log.exception("flushing caches at shutdown failed")

    def _serve(self) -> None:
        while (item := self._next_item()) is not None:
            if isinstance(item, Turn):
                self._current = item
                try:
                    self._run(item)
                finally:
                    self._current = None
                    self._last_turn_at = time.monotonic()
                    with self._active_lock:
                        self._active -= 1
                self._refresh_snapshot()
            else:
                self._run_task(item)

    def _run_task(self, task: _Task) -> None:
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

    def _next_item(self) -> "Turn | _Task | None":
        """The next queued item; while there is none, the idle stages (see the module doc).
        The delays count from the end of the last turn, not of the last task: a task must not
        keep postponing them."""
        while True:
            if self._room_for is not None:
                item = self._wait(0)
                if item is not _EMPTY:
                    return item
                self._make_room()
            now = time.monotonic()
            idle = now - self._last_turn_at
            if self.cache_ttl_s > 0 and now - self._last_expiry_at >= TTL_CHECK_S:
                self._last_expiry_at = now
                self._expire()
            # How long to wait for work before the next idle duty is due (None: forever).
            waits = [TTL_CHECK_S] if self.cache_ttl_s > 0 else []
            if idle < self.write_behind_delay_s:
                waits.append(self.write_behind_delay_s - idle)
            else:
                item = self._wait(0)
                if item is not _EMPTY:
                    return item
                if self._write_behind():
                    continue
                if self.idle_unload_s > 0 and self.runtime.loaded:
                    if idle >= self.idle_unload_s:
                        self._unload()
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
        try:
            if self.store.make_room(key, NEXT_TURN_ROOM):
                self._refresh_snapshot()
        except Exception:  # noqa: BLE001 - an idle duty must never stop the engine
            log.exception("making room in a cache failed")

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

    def _unload(self) -> None:
        try:
            moved = self.store.spill()
        except Exception:  # noqa: BLE001 - unloading must not stop the engine
            log.exception("moving caches to the disk tier before unloading failed")
            moved = 0
        self._refresh_snapshot()  # the caches' new places, before the status says "not loaded"
        self.runtime.unload()
        log.info("idle for %.0f s: model unloaded, %d caches moved to disk", self.idle_unload_s, moved)

    def _refresh_snapshot(self) -> None:
        self._stats = self.store.stats()

    def _run(self, turn: Turn) -> None:
        self.counters.requests += 1
        try:
            if turn.cancelled.is_set():
                raise TurnCancelledError("cancelled before it started")
            self._generate(turn)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the handler
            self.store.release()
            self.counters.requests_failed += 1
            if not isinstance(exc, MlxkvError):
                log.exception("turn of %r failed", turn.plan.conversation_id)
            if not turn.one_shot:
                self.registry.abandon_turn(turn.plan)
            turn.events.put(Failed(exc))

    def _generate(self, turn: Turn) -> None:
        rt = self.runtime
        plan = turn.plan
        started = time.perf_counter()
        if not rt.loaded:
            rt.ensure_loaded()
        prompt = turn.prompt.ids
        max_tokens = min(turn.max_tokens, rt.context_length - len(prompt))
        sampling = turn.sampling
        if sampling.top_k >= self._vocab_size:
            # Keeping more tokens than the vocabulary has keeps them all. mlx-lm raises on it,
            # inside a compiled function, which breaks every later sampled turn of the process.
            sampling = dataclasses.replace(sampling, top_k=0)
        key = None if turn.one_shot else plan.conversation_id
        # The cache this turn grows counts against the memory budget from the start.
        lookup = self.store.checkout(key, prompt, reserve_bytes=rt.kv_nbytes(len(prompt) + max_tokens))
        self._refresh_snapshot()  # the status shows the reservation while the turn runs
        cache = lookup.cache if lookup.cache is not None else rt.make_cache()
        cached = lookup.cached_tokens
        reason = lookup.reason
        if lookup.diverged_at is not None and reason:
            index = turn.prompt.message_at(lookup.diverged_at, plan.messages)
            reason = f"{reason} (message {index}, role {plan.messages[index].get('role')})"
        if reason:
            log.info("conversation %r reuses %d of its tokens: %s", key, cached, reason)
        turn.events.put(Started(len(prompt), cached, lookup.source, reason, turn.tools_ignored))

        generated: list[int] = []
        held = cached  # tokens the cache holds
        checkpoint = None
        pending: list[int] = []
        finish = "length"
        first_token_at = None
        reply = Reply(rt.tokenizer, stop=turn.stop, tool_format=turn.tool_format,
                      tools=template_tools(plan.tools), prefix=turn.reply_prefix)
        eos = rt.eos_token_ids
        try:
            # Prefill in chunks that a cancel can stop between, up to the last chunk, which
            # generate() feeds in the same forward pass that samples the first token.
            boundary = turn.boundary if turn.boundary is not None and turn.boundary >= cached else None
            last_chunk = max(held, len(prompt) - rt.prefill_step)
            for target in sorted({last_chunk} | ({boundary} if boundary is not None else set())):
                held += rt.prefill(prompt[held:target], cache, turn.cancelled)
                if held < target:
                    raise TurnCancelledError("the client cancelled the turn")
                if target == boundary:
                    checkpoint = (prompt[:held], self._ops.copy_prefix(cache, held))
                    self.store.reserve(self._ops.nbytes(checkpoint[1]))
                    self._refresh_snapshot()
            # Closed on every exit, so that the cache holds every token generated (see generate).
            with contextlib.closing(
                rt.generate(prompt[held:], cache, max_tokens=max_tokens, sampling=sampling)
            ) as tokens:
                for token in tokens:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    generated.append(token)
                    turn.generated = len(generated)
                    if turn.cancelled.is_set():
                        raise TurnCancelledError("the client cancelled the turn")
                    if token in eos:
                        finish = "stop"
                        break
                    pending.append(token)
                    text, calls = reply.add(token)
                    if reply.stopped:
                        finish = "stop_string"
                    # The first token goes out at once, even with no text yet (a partial
                    # character, a held-back space): the client sees the turn has started.
                    if text or calls or len(generated) == 1 or reply.stopped:
                        turn.events.put(Text(text, tuple(pending), tuple(calls)))
                        pending = []
                    if reply.stopped:
                        break
        except TurnCancelledError:
            self.counters.tokens_saved += cached
            self.counters.tokens_prefilled += len(prompt) - cached
            self.counters.tokens_generated += len(generated)
            at_cancel = turn.generated_at_cancel or 0
            log.info(
                "turn conversation=%s cancelled: generated=%d, %d after the cancel; not committed",
                key or "-",
                len(generated),
                len(generated) - at_cancel,
            )
            # The cache holds the prompt (or the part prefilled) plus every token yielded so
            # far: still usable.
            held = len(prompt) + len(generated) if generated else held
            self.store.checkin(key, (prompt + generated)[:held], cache, checkpoint=checkpoint)
            raise
        # Any other failure leaves the cache in an unknown state: it is dropped, never reused.
        text, calls = reply.finish(cut=finish == "length")
        if text or calls or pending:
            turn.events.put(Text(text, tuple(pending), tuple(calls)))
        if finish == "stop" and reply.tool_calls:
            finish = "tool_calls"

        done_at = time.perf_counter()
        first_token_at = first_token_at or done_at
        prefill_s = max(first_token_at - started, 1e-9)
        decode_s = done_at - first_token_at
        revision = 0
        if not turn.one_shot:
            revision = self.registry.commit_turn(plan, reply.message(), prompt=turn.prompt)
        self.counters.tokens_saved += cached
        self.counters.tokens_prefilled += len(prompt) - cached
        self.counters.tokens_generated += len(generated)
        finished = Finished(
            finish_reason=finish,
            text=reply.content,
            tool_calls=tuple(reply.tool_calls),
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            completion_tokens=len(generated),
            time_to_first_token_s=first_token_at - turn.submitted_at,
            prefill_tokens_per_s=(len(prompt) - cached) / prefill_s,
            decode_tokens_per_s=(len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0,
            total_s=done_at - turn.submitted_at,
            queue_s=started - turn.submitted_at,
            revision=revision,
        )
        log.info(
            "turn conversation=%s revision=%d prompt=%d reused=%d source=%s prefilled=%d "
            "generated=%d finish=%s ttft=%.3fs prefill=%.0ftok/s decode=%.1ftok/s",
            key or "-",
            revision,
            len(prompt),
            cached,
            lookup.source,
            len(prompt) - cached,
            len(generated),
            finish,
            finished.time_to_first_token_s,
            finished.prefill_tokens_per_s,
            finished.decode_tokens_per_s,
        )
        turn.events.put(finished)
        # After the reply is out: an eviction this causes may write to disk.
        self.store.checkin(key, prompt + generated, cache, checkpoint=checkpoint)
        self._room_for = key
        for forgotten in self.registry.pop_forgotten():
            self.store.delete(forgotten)
