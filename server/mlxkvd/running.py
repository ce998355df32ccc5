"""One turn on the engine thread, from its cache lease to its commit: the turn's story.

``RunningTurn.begin`` leases the longest cached prefix of the prompt from the store (its
growth reserved against the memory budget) and sends ``Started``. The engine then feeds the
rest of the prompt and the generated tokens, serially or as a row of a batch; each generated
token goes to ``on_token``, which streams the reply's text and tool calls. ``complete``
commits the reply to the registry, sends ``Finished`` and checks the cache back in;
``cancelled`` keeps what the cache holds without committing; ``fail`` drops it. Exactly one
of the three ends every begun turn.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from .conversations import ConversationRegistry
from .errors import MlxkvError
from .events import Failed, Finished, Started, Text, Turn
from .kvcache import MlxCacheOps
from .prompt import template_tools
from .reply import Reply
from .runtime import MIN_TEMPERATURE, ModelRuntime, Sampling
from .speculative import Drafter
from .store import CacheStore, Lease

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Counters:
    requests: int = 0
    requests_failed: int = 0
    tokens_saved: int = 0
    tokens_prefilled: int = 0
    tokens_generated: int = 0
    tokens_drafted: int = 0
    tokens_accepted: int = 0


class RunningTurn:
    """A turn's state while the engine works on it (engine thread only)."""

    def __init__(self, turn: Turn, runtime: ModelRuntime, store: CacheStore,
                 registry: ConversationRegistry, counters: Counters, vocab_size: int):
        counters.requests += 1
        self.turn = turn
        self._rt = runtime
        self._store = store
        self._registry = registry
        self._counters = counters
        self.key = None if turn.one_shot else turn.plan.conversation_id
        self.prompt = turn.prompt.ids
        self.max_tokens = min(turn.max_tokens, turn.context_length_of(runtime) - len(self.prompt))
        sampling = turn.sampling
        if sampling.top_k >= vocab_size:
            # Keeping more tokens than the vocabulary has keeps them all. mlx-lm raises on it,
            # inside a compiled function, which breaks every later sampled turn of the process.
            sampling = dataclasses.replace(sampling, top_k=0)
        self.sampling: Sampling = sampling
        self.sampler = runtime.sampler(sampling)  # the turn's, whether it runs alone or batched
        self.lease: Lease | None = None
        self.cache: Any = None  # None again once a batch holds it (Batch.add)
        self.cached = 0  # prompt tokens the lease gave
        self.held = 0  # tokens the cache holds
        self.checkpoint = None
        self.generated: list[int] = []
        self._pending: list[int] = []  # generated ids not sent with a Text yet
        self.finish = "length"
        self.started_at = self.leased_at = 0.0
        self.first_token_at: float | None = None
        self.lookup: Drafter | None = None  # set by the engine when the turn speculates
        self.reply = Reply(runtime.tokenizer, stop=turn.stop, tool_format=turn.tool_format,
                           tools=template_tools(turn.plan.tools), prefix=turn.reply_prefix)
        self._eos = runtime.eos_token_ids

    @property
    def speculates(self) -> bool:
        """Whether the turn asks for speculative decoding and can have it: greedy sampling
        (its tokens are then those of decoding one at a time)."""
        return self.turn.speculative in ("prompt-lookup", "draft") and self.sampling.temperature < MIN_TEMPERATURE

    @property
    def reserve_bytes(self) -> int:
        return self.reserve_for(self.turn, self._rt)

    @staticmethod
    def reserve_for(turn: Turn, runtime: ModelRuntime) -> int:
        """What a turn's cache may grow to: counted against the budget from its start."""
        return runtime.kv_nbytes(RunningTurn.length_for(turn, runtime))

    @staticmethod
    def length_for(turn: Turn, runtime: ModelRuntime) -> int:
        """The most tokens a turn's cache holds: its prompt and every token it may generate."""
        prompt = len(turn.prompt.ids)
        return prompt + min(turn.max_tokens, turn.context_length_of(runtime) - prompt)

    def begin(self, refresh: Callable[[], None]) -> None:
        """Lease the cache and send ``Started``; ``refresh`` updates the status snapshot."""
        self.started_at = time.perf_counter()
        self.lease = self._store.lease(self.key, self.prompt, reserve_bytes=self.reserve_bytes)
        self.leased_at = time.perf_counter()
        refresh()  # the status shows the reservation while the turn runs
        lookup = self.lease.lookup
        self.cache = lookup.cache if lookup.cache is not None else self._rt.make_cache()
        self.cached = self.held = lookup.cached_tokens
        reason = lookup.reason
        plan = self.turn.plan
        if lookup.diverged_at is not None and reason:
            index = self.turn.prompt.message_at(lookup.diverged_at, plan.messages)
            reason = f"{reason} (message {index}, role {plan.messages[index].get('role')})"
        if plan.previous_model:
            why = (f"its last turn ran on model {plan.previous_model!r}; a cache belongs to the "
                   f"model that made it, so {plan.model!r} prefills what it has not cached itself")
            reason = f"{why}: {reason}" if reason else why
        if reason:
            log.info("conversation %r reuses %d of its tokens: %s", self.key, self.cached, reason)
        self.turn.events.put(Started(len(self.prompt), self.cached, lookup.source, reason,
                                     self.turn.tools_ignored))

    def take_checkpoint(self, ops: MlxCacheOps) -> None:
        """A copy of the cache at the turn boundary (caches that cannot be trimmed)."""
        self.checkpoint = (self.prompt[: self.held], ops.copy_prefix(self.cache, self.held))
        self.lease.reserve(ops.nbytes(self.checkpoint[1]))

    def on_token(self, token: int) -> bool:
        """One generated token (the cache holds it or will); True when the reply is over."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            log.debug("first token %.1f ms after the lease", (self.first_token_at - self.leased_at) * 1e3)
        self.generated.append(token)
        self.turn.generated = len(self.generated)
        if token in self._eos:
            self.finish = "stop"
            return True
        self._pending.append(token)
        text, calls = self.reply.add(token)
        if self.reply.stopped:
            self.finish = "stop_string"
        # The first token goes out at once, even with no text yet (a partial character, a
        # held-back space): the client sees the turn has started.
        if text or calls or len(self.generated) == 1 or self.reply.stopped:
            self.turn.events.put(Text(text, tuple(self._pending), tuple(calls)))
            self._pending = []
        return self.reply.stopped or len(self.generated) >= self.max_tokens

    def complete(self, cache: Any) -> str | None:
        """The reply is over and ``cache`` holds the prompt and every generated token: commit,
        send ``Finished``, check the cache in. Returns the conversation key (None: one-shot)."""
        text, calls = self.reply.finish(cut=self.finish == "length")
        if text or calls or self._pending:
            self.turn.events.put(Text(text, tuple(self._pending), tuple(calls)))
        if self.finish == "stop" and self.reply.tool_calls:
            self.finish = "tool_calls"
        done_at = time.perf_counter()
        first = self.first_token_at or done_at
        prefill_s = max(first - self.started_at, 1e-9)
        decode_s = done_at - first
        turn, prompt, generated = self.turn, self.prompt, self.generated
        revision = 0
        if not turn.one_shot:
            revision = self._registry.commit_turn(turn.plan, self.reply.message(), prompt=turn.prompt)
        self._count()
        finished = Finished(
            finish_reason=self.finish,
            text=self.reply.content,
            tool_calls=tuple(self.reply.tool_calls),
            prompt_tokens=len(prompt),
            cached_tokens=self.cached,
            completion_tokens=len(generated),
            time_to_first_token_s=first - turn.submitted_at,
            prefill_tokens_per_s=(len(prompt) - self.cached) / prefill_s,
            decode_tokens_per_s=(len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0,
            total_s=done_at - turn.submitted_at,
            queue_s=self.started_at - turn.submitted_at,
            revision=revision,
            drafted_tokens=self.lookup.drafted if self.lookup else 0,
            accepted_tokens=self.lookup.accepted if self.lookup else 0,
        )
        drafts = (f" drafted={finished.drafted_tokens} accepted={finished.accepted_tokens}"
                  if self.lookup else "")
        log.info(
            "turn conversation=%s revision=%d prompt=%d reused=%d source=%s prefilled=%d "
            "generated=%d finish=%s ttft=%.3fs (queue %.1f ms, lease %.1f ms) prefill=%.0ftok/s "
            "decode=%.1ftok/s%s",
            self.key or "-", revision, len(prompt), self.cached, self.lease.lookup.source,
            len(prompt) - self.cached, len(generated), self.finish, finished.time_to_first_token_s,
            finished.queue_s * 1000, (self.leased_at - self.started_at) * 1000,
            finished.prefill_tokens_per_s, finished.decode_tokens_per_s, drafts,
        )
        turn.events.put(finished)
        # After the reply is out: an eviction this causes may write to disk.
        self.lease.checkin(prompt + generated, cache, checkpoint=self.checkpoint)
        return self.key

    def cancelled(self, cache: Any, held: int) -> None:
        """The client went away; ``cache`` holds the first ``held`` tokens of the prompt and the
        generated ones: still usable, kept, nothing committed."""
        self._count()
        at_cancel = self.turn.generated_at_cancel or 0
        log.info("turn conversation=%s cancelled: generated=%d, %d after the cancel; not committed",
                 self.key or "-", len(self.generated), len(self.generated) - at_cancel)
        self.lease.checkin((self.prompt + self.generated)[:held], cache, checkpoint=self.checkpoint)

    def fail(self, exc: BaseException) -> None:
        """The turn failed (cancelled ones included): release what it held, tell the client.
        Any failure but a cancel leaves the cache in an unknown state: it is dropped."""
        if self.lease is not None:
            self.lease.release()
        self._counters.requests_failed += 1
        if not isinstance(exc, MlxkvError):
            log.exception("turn of %r failed", self.turn.plan.conversation_id, exc_info=exc)
        if not self.turn.one_shot:
            self._registry.abandon_turn(self.turn.plan)
        self.turn.events.put(Failed(exc))

    def _count(self) -> None:
        self._counters.tokens_saved += self.cached
        self._counters.tokens_prefilled += len(self.prompt) - self.cached
        self._counters.tokens_generated += len(self.generated)
        if self.lookup is not None:
            self._counters.tokens_drafted += self.lookup.drafted
            self._counters.tokens_accepted += self.lookup.accepted
