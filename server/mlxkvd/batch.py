"""Turns of different conversations decoded together: rows of mlx-lm's ``BatchGenerator``.

Each decode step advances every row by one token in one forward pass; a row whose prompt is
still being prefilled advances by one prefill chunk per step, after the decode, so that rows
already streaming wait at most one chunk between two tokens: newcomers prefill together only
while their chunks add up to one chunk (a pass over many tokens costs what its tokens cost, on
the CPU and on a GPU alike, so several newcomers' full chunks in one step would multiply the
gap; the short prompts of cached conversations still share a pass). A row enters with the
cache the store leased it (any tier) and the tokens that cache does not hold yet; it leaves on
end of turn or at its token limit (``step`` hands its cache back), or when the engine takes it
out (a stop string, a cancel: ``remove``). The cache that leaves is an ordinary
per-conversation KV cache holding exactly the row's tokens, as a serial turn leaves it.

The batch pads every row's cache to its longest row; ``Batch.admits`` and the batch's own
reservation in the store count that padding against the memory budget.

``BatchMode`` is the engine's batch mode (a part of ``Engine``, kept here): waiting turns
admitted as rows, cancelled rows taken out, one step per cycle.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
from dataclasses import dataclass
from typing import Any, Sequence

from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache

from .errors import ShuttingDownError, TurnCancelledError
from .events import Failed, Turn
from .runtime import ModelRuntime, SeededSampler
from .running import RunningTurn
from .store import CacheStore

# BatchMode is a part of the engine: its lines are the engine's.
log = logging.getLogger("mlxkvd.engine")


@dataclass
class Step:
    """One row's token from a decode step; ``cache`` is set when the row left the batch (its
    cache then holds the prompt and every token of the row, this one included)."""

    run: RunningTurn
    token: int
    cache: Any = None


def _last_token(segments: list[list[int]]) -> bool:
    """Whether a row's prompt left to feed is one token (fed by its first decode)."""
    return len(segments) == 1 and len(segments[0]) == 1


class _Generator(BatchGenerator):
    """mlx-lm's ``BatchGenerator``, but a row whose prompt is down to its last token starts
    decoding at the start of a step rather than at its end.

    mlx-lm moves such a row (a handed-over turn re-feeding its last generated token, a row
    whose last prefill chunk was the previous step's, a cached prompt but one token) into the
    decode batch after the step's decode and before its prefill chunk: its first token comes
    out of the next step's decode, one whole step (one more of another row's prefill chunks)
    late. Here it moves before the decode, so that this step's decode returns its token.

    The move is mlx-lm's own (``_make_batch``, then ``PromptProcessingBatch.generate`` into
    the decode batch, as in ``BatchGenerator._next``), done earlier: it relies on mlx-lm
    0.32's ``BatchGenerator`` internals (``_unprocessed_sequences`` entries, whose second
    item is the prompt's segments, ``_currently_processing``, ``_prompt_batch``,
    ``_generation_batch``).
    """

    def _next(self):
        self._start_decoding()
        self.prefill_batch_size = self._prefill_rows()
        return super()._next()

    def _prefill_rows(self) -> int:
        """How many rows the prompt batch may hold this step: those it holds, then newcomers
        in order while the step's prefill pass (rows x the longest row's chunk, as the rows are
        padded to it) stays within one chunk; at least one."""
        def chunk(segments: list[list[int]]) -> int:  # what the row feeds this step
            return min(sum(map(len, segments)), self.prefill_step_size)

        lengths = [chunk(seq[0]) for seq in self._currently_processing]
        for seq in self._unprocessed_sequences:
            more = lengths + [chunk(seq[1])]
            if len(more) * max(more) > self.prefill_step_size:
                break
            lengths = more
        return max(1, len(lengths))

    def _start_decoding(self) -> None:
        # Rows not in the prompt batch yet: straight to the decode batch, without joining (and
        # being copied with) the prompt batch's cache.
        ready = [s for s in self._unprocessed_sequences if _last_token(s[1])]
        if ready:
            rest = [s for s in self._unprocessed_sequences if not _last_token(s[1])]
            self._unprocessed_sequences = collections.deque(ready + rest)  # taken from the front
            batch = self._make_batch(len(ready))
            inputs = [seq[0][0] for seq in self._currently_processing[-len(ready):]]
            del self._currently_processing[-len(ready):]  # they do not join the prompt batch
            self._generation_batch.extend(batch.generate(inputs))
        # Rows of the prompt batch whose last chunk was fed: as BatchGenerator._next does.
        split = [i for i, seq in enumerate(self._currently_processing) if _last_token(seq[0])]
        if split:
            inputs = [self._currently_processing[i][0][0] for i in split]
            self._currently_processing = [
                s for i, s in enumerate(self._currently_processing) if i not in split]
            self._generation_batch.extend(self._prompt_batch.split(split).generate(inputs))


class Batch:
    """The rows decoding together (engine thread only), and the memory their padding takes."""

    def __init__(self, runtime: ModelRuntime, store: CacheStore, max_rows: int):
        self._gen = _Generator(
            runtime.model,
            stop_tokens=[[t] for t in sorted(runtime.eos_token_ids)],
            completion_batch_size=max_rows,
            prefill_step_size=runtime.prefill_step,
        )
        self._runtime = runtime
        self._store = store
        self._rows: dict[int, RunningTurn] = {}
        self._uids: dict[int, int] = {}  # id(run) -> uid
        self._lengths: dict[int, int] = {}  # uid -> the most tokens the row's cache holds
        # The padding's reservation (see _padding_for), under a lease of the batch's own.
        self._lease = store.new_lease()
        self._padding = 0
        # Bytes of one 256-token step of every layer, counted per token in _padding_for: batch
        # caches are plain KVCache layers (can_batch) whose allocations are not whole steps.
        self._step_bytes = runtime.kv_nbytes(KVCache.step)
        # Tokens a row's batch cache may hold beyond the longest row (see _padding_for).
        # Newcomers prefilling together are padded to the longest: at most half a chunk each
        # (two rows of up to half a chunk; more rows, shorter ones).
        self._slack = KVCache.step + runtime.prefill_step // 2

    def __len__(self) -> int:
        return len(self._rows)

    def runs(self) -> list[RunningTurn]:
        return list(self._rows.values())

    def add(self, run: RunningTurn, held: Sequence[int], new: Sequence[int]) -> None:
        """``run`` joins with its cache (``run.cache``, holding the tokens ``held``); ``new``
        (not empty) are fed next, then the row generates up to the run's remaining tokens.
        The batch owns the cache from now on: the run and its lease let go of it (the batch
        copies it into its own cache; the row's cache comes back from ``step`` or ``remove``)."""
        [uid] = self._gen.insert(
            [list(new)],
            max_tokens=[run.max_tokens - len(run.generated)],
            caches=[run.cache],
            all_tokens=[list(held)],
            samplers=[run.sampler],
        )
        run.cache = None
        if run.lease is not None:
            run.lease.lookup.cache = None
        self._rows[uid] = run
        self._uids[id(run)] = uid
        self._lengths[uid] = RunningTurn.length_for(run.turn, self._runtime)
        self._reserve_padding()

    def admits(self, turn: Turn) -> bool:
        """Whether the memory budget has room for ``turn`` as one more row: its reservation
        and what the batch's padding grows by, beside what is reserved already."""
        length = RunningTurn.length_for(turn, self._runtime)
        padding = self._padding_for([*self._lengths.values(), length])
        return self._store.can_reserve(self._runtime.kv_nbytes(length) + padding - self._padding)

    def step(self) -> list[Step]:
        """One decode step of the generating rows, then one prefill chunk of the others."""
        if log.isEnabledFor(logging.DEBUG):
            return self._logged_step()
        _, responses = self._gen.next()
        return self._steps(responses)

    def _logged_step(self) -> list[Step]:
        """``step``, and a DEBUG line for a step that prefilled: where its time went."""
        with self._gen.stats() as stats:
            _, responses = self._gen.next()
        if stats.prompt_tokens:
            log.debug("batch step (%d rows decoding): decode %.1f ms, %d prompt tokens prefilled in %.1f ms, %.1f ms in all",
                      len(self._gen._generation_batch), stats.decode_time * 1e3, stats.prompt_tokens,
                      stats.prompt_time * 1e3, stats.wall_time * 1e3)
        return self._steps(responses)

    def _steps(self, responses) -> list[Step]:
        steps = []
        for r in responses:
            run = self._rows[r.uid]
            if r.finish_reason is not None:
                self._forget(r.uid)
            steps.append(Step(run, int(r.token), r.prompt_cache))
        return steps

    def remove(self, run: RunningTurn) -> tuple[Any, list[int]]:
        """Take ``run``'s row out: its cache and the tokens that cache holds."""
        uid = self._uids[id(run)]
        cache, tokens = self._gen.remove([uid], return_prompt_caches=True)[uid]
        self._forget(uid)
        return cache, list(tokens)

    def close(self) -> None:
        self._store.release(lease=self._lease)
        self._padding = 0
        self._gen.close()

    def _forget(self, uid: int) -> None:
        run = self._rows.pop(uid)
        del self._uids[id(run)]
        del self._lengths[uid]
        self._reserve_padding()

    def _padding_for(self, lengths: list[int]) -> int:
        """What rows that grow to ``lengths`` tokens take beyond their own reservations
        (``runtime.kv_nbytes`` of their lengths), batched.

        A batch cache (mlx-lm's ``BatchKVCache``) holds every row at the width of its longest
        row, the shorter ones left-padded (a row leaving trims the padding no row needs), and
        allocates up to one 256-token step past that width (not whole steps: merged and
        extended caches start at their exact width): each row takes at most the longest
        row's tokens plus one step. Newcomers prefilling together right-pad a short last chunk
        to the step's longest chunk: at most half a chunk more (two or more rows share one
        chunk's tokens). Conservative: the longest row counts at its final length from the start.
        Not counted: copies that live for one step (a row leaving its prefill copies the
        prompt batch's cache; a row's cache handed back is copied out of the batch's)."""
        if not lengths:
            return 0
        per_row = math.ceil(self._step_bytes * (max(lengths) + self._slack) / KVCache.step)
        return max(0, len(lengths) * per_row - sum(self._runtime.kv_nbytes(n) for n in lengths))

    def _reserve_padding(self) -> None:
        """Hold the padding of the rows in the batch now (evicting resident caches for it)."""
        padding = self._padding_for(list(self._lengths.values()))
        if padding != self._padding:
            self._store.release(lease=self._lease)
            self._padding = padding
            if padding:
                self._store.reserve(padding, lease=self._lease)


class BatchMode:
    """The engine's batch mode: a part of ``Engine`` (its base class), kept beside the batch.

    A serial turn that sees another turn waiting hands itself over (``_hand_over``); from then
    on the engine runs ``_run_batched`` cycles until the batch empties. Uses the engine's
    queue, its waiting turns (``_waiting``) and its turn endings (``_new_run``, ``_complete``,
    ``_fail``, ``_run_task``, ``_refresh_snapshot``).
    """

    _batch: Batch | None
    _waiting: collections.deque[Turn]
    _deferred: collections.deque[Turn]

    def _hand_over(self, run: RunningTurn, held: list[int], new: list[int]) -> None:
        """The serial turn becomes the first row of a batch; the waiting turns join it."""
        if isinstance(run.sampler, SeededSampler):
            run.sampler.rewind(len(run.generated))  # the row draws the token after them again
        if run.lookup is not None:
            log.info("conversation %r: speculative decoding stops, the turn goes on as a batch row", run.key)
        self._batch = Batch(self.runtime, self.store, self.max_batch)
        self._batch.add(run, held, new)
        log.info("batching: another turn arrived while conversation %r was running", run.key)

    def _run_batched(self) -> bool:
        """One cycle of batch mode: queued work taken in (turns wait for admission, tasks run),
        cancelled rows taken out, one decode step (plus a prefill chunk). False once the
        engine is stopping and nothing is left to run."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping_seen = True
            elif isinstance(item, Turn) and item.warm:
                self._deferred.append(item)  # warm-ups wait for the batch to empty
            elif isinstance(item, Turn):
                self._waiting.append(item)
            else:
                self._run_task(item)
        for turn in [t for t in self._waiting if t.cancelled.is_set()]:
            self._waiting.remove(turn)  # its client left while it waited for room
            self._fail(self._new_run(turn), TurnCancelledError("cancelled before it started"))
        self._admit()
        batch = self._batch
        for run in batch.runs():
            if run.turn.cancelled.is_set():
                cache, tokens = batch.remove(run)
                error: BaseException = TurnCancelledError("the client cancelled the turn")
                try:
                    run.cancelled(cache, len(tokens))
                except Exception as exc:  # noqa: BLE001 - keeping its cache failed: this row alone
                    error = exc
                self._fail(run, error)
        if len(batch):
            try:
                steps = batch.step()
            except Exception as exc:  # noqa: BLE001 - the rows' caches are in an unknown state
                for run in batch.runs():
                    batch.remove(run)
                    self._fail(run, exc)
                steps = []
            for step in steps:
                try:
                    over = step.run.on_token(step.token)
                except Exception as exc:  # noqa: BLE001 - this row's reply failed: this row alone
                    if step.cache is None:
                        batch.remove(step.run)
                    self._fail(step.run, exc)
                    continue
                if over or step.cache is not None:
                    cache = step.cache if step.cache is not None else batch.remove(step.run)[0]
                    self._complete(step.run, cache)
        if not len(batch) and not self._waiting:
            batch.close()
            self._batch = None
            self._refresh_snapshot()
            return not self._stopping_seen
        return True

    def _admit(self) -> None:
        """Start waiting turns, oldest first, while the batch has rows free and the memory
        budget has room for their caches beside those in flight, padding included (a turn
        that does not fit waits; its wait shows as its queue time)."""
        batch = self._batch
        while self._waiting and len(batch) < self.max_batch:
            turn = self._waiting[0]
            if len(batch) and not batch.admits(turn):
                return
            self._waiting.popleft()
            run = self._new_run(turn)
            try:
                if turn.cancelled.is_set():
                    raise TurnCancelledError("cancelled before it started")
                if not self.runtime.loaded:
                    self.runtime.ensure_loaded()
                run.begin(self._refresh_snapshot)
                if run.speculates:
                    log.info("conversation %r: no speculative decoding for a batch row", run.key)
                batch.add(run, run.prompt[: run.held], run.prompt[run.held:])
                self._refresh_snapshot()  # the status shows the row's reservation and padding
            except BaseException as exc:  # noqa: BLE001 - the handler gets every failure
                self._fail(run, exc)

    def _fail_batch(self) -> None:
        """The engine thread is ending with a batch (it died): every row and every turn
        waiting for admission fails, so that no client waits for a turn nobody runs."""
        batch, self._batch = self._batch, None
        waiting = list(self._waiting)
        self._waiting.clear()
        runs = batch.runs() if batch is not None else []
        if not runs and not waiting:
            return
        log.error("failing %d batched and %d waiting turns: the engine stopped", len(runs), len(waiting))
        error = ShuttingDownError("the daemon is shutting down")
        for item in [*runs, *waiting]:
            turn = item if isinstance(item, Turn) else item.turn
            try:
                self._fail(self._new_run(item) if isinstance(item, Turn) else item, error)
            except BaseException:  # noqa: BLE001 - its client must still hear of it
                log.exception("failing a turn of %r failed", turn.plan.conversation_id)
                turn.events.put(Failed(error))
        if batch is not None:
            try:
                batch.close()
            except BaseException:  # noqa: BLE001 - its state is unknown; the thread is ending
                log.exception("closing the batch failed")
