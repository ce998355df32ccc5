"""Speculative decoding of greedy turns: draft tokens verified several per forward pass.

A drafter proposes what may come next; ``generate`` feeds the pending token and the draft in
one forward pass; the model's greedy token at each position is compared with the draft, the
agreeing prefix is accepted plus the model's own token after it, and the cache is trimmed back
past the rejected rest. The tokens are those of greedy decoding one at a time (the tests
compare them), so only greedy turns speculate. Two drafters:

- ``PromptLookup``: an answer that copies text already in the conversation (an edited file, a
  function, a diff). It keeps the turn's tokens (the prompt, then the reply as it grows) and
  proposes, after each token, what followed the most recent earlier occurrence of the last few
  tokens (the longest of ``NGRAM_MAX`` down to ``NGRAM_MIN`` tokens that occurs).
- ``drafting.DraftProposer``: a small model with the same vocabulary (``--draft-model``).

Both adapt (``Drafter.record``) so that prose does not get slower: the draft length grows while
drafts are accepted whole and shrinks to what was accepted; after ``MISSES_TO_PAUSE`` drafts in
a row that did not pay for themselves (the time the accepted tokens saved, one verifying pass
each, was less than the time drafting took: for prompt lookup, nothing accepted), drafting
pauses for a number of tokens that doubles each time (a step without a draft is an ordinary
one-token step).

mlx-lm's ``speculative_generate_step`` prefills the target and the draft model with the same
prompt and drafts a fixed number of tokens; here the draft model's cache of a conversation is
its own (it may hold more or less of the history than the target's), the draft length adapts,
and prompt lookup needs no second model, so the verification loop is this module's.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

NGRAM_MAX = 4
NGRAM_MIN = 2
DRAFT_START = 4
DRAFT_MAX = 16
MISSES_TO_PAUSE = 3
PAUSE_START = 8
PAUSE_MAX = 256


class Drafter:
    """What ``generate`` asks of a drafter: ``append`` the tokens produced, ``propose`` a
    draft, ``record`` how much of it was accepted, ``close`` when the turn's generation ends.
    The draft length ``k`` and the pauses adapt here; ``drafted`` and ``accepted`` count."""

    def __init__(self) -> None:
        self.k = DRAFT_START
        self._misses = 0
        self._pause = 0
        self._pause_len = PAUSE_START
        self.drafted = 0
        self.accepted = 0

    def append(self, tokens: Sequence[int]) -> None:
        raise NotImplementedError

    def propose(self, limit: int) -> list[int]:
        """Up to ``min(k, limit)`` draft tokens; [] while paused or when there is nothing."""
        if self._pause > 0:
            self._pause -= 1
            return []
        k = min(self.k, limit)
        return self._draft(k) if k > 0 else []

    def _draft(self, k: int) -> list[int]:
        raise NotImplementedError

    def record(self, drafted: int, accepted: int, draft_s: float = 0.0, verify_s: float = 0.0) -> None:
        """The outcome of one verified draft (``draft_s`` spent drafting it, ``verify_s`` in
        the verifying pass): adapt the draft length and the pauses."""
        self.drafted += drafted
        self.accepted += accepted
        paid = accepted > 0 and accepted * verify_s >= draft_s
        if accepted == drafted and paid:
            self.k = min(DRAFT_MAX, self.k * 2)
            self._misses = 0
            self._pause_len = PAUSE_START
            return
        self.k = max(1, min(self.k, accepted + 1))
        if paid:
            self._misses = 0
            return
        self._misses += 1
        if self._misses >= MISSES_TO_PAUSE:
            self._misses = 0
            self._pause = self._pause_len
            self._pause_len = min(PAUSE_MAX, self._pause_len * 2)

    def close(self) -> None:
        """The turn's generation ended (however it did)."""


class PromptLookup(Drafter):
    """Draft tokens for one turn from its own tokens."""

    def __init__(self, tokens: Sequence[int], room: int):
        super().__init__()
        self._tokens = np.zeros(len(tokens) + room, dtype=np.int64)
        self._tokens[: len(tokens)] = tokens
        self._n = len(tokens)

    def append(self, tokens: Sequence[int]) -> None:
        if self._n + len(tokens) > len(self._tokens):  # grows past ``room``: double it
            self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
        self._tokens[self._n : self._n + len(tokens)] = tokens
        self._n += len(tokens)

    def _draft(self, k: int) -> list[int]:
        """What followed the last occurrence of the longest recent n-gram that occurred before."""
        seq, n_total = self._tokens, self._n
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if n_total <= n:
                continue
            tail = seq[n_total - n : n_total]
            # Starts of earlier occurrences: i + n < n_total, so the tail itself is not one.
            hits = np.flatnonzero(seq[: n_total - n] == tail[0])
            for j in range(1, n):
                hits = hits[seq[hits + j] == tail[j]]
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start : min(start + k, n_total)].tolist()
        return []


def can_speculate(cache: list) -> bool:
    """Whether rejected draft tokens can be trimmed off this cache."""
    return can_trim_prompt_cache(cache)


def generate(runtime, new_tokens: Sequence[int], cache: list, drafter: Drafter, *,
             max_tokens: int, sampler) -> Iterator[int]:
    """Greedy tokens after ``new_tokens``, as ``ModelRuntime.generate`` yields them (the same
    first step, the same promise: however the caller stops, the cache holds the prompt and
    every token yielded), verified several per forward pass where ``drafter`` has a draft.
    ``drafter`` holds the prompt and learns every token produced; it is closed at the end.
    ``sampler`` is the turn's (greedy) one, for the first token."""
    try:
        yield from _verified(runtime, new_tokens, cache, drafter, max_tokens, sampler)
    finally:
        drafter.close()


def _verified(runtime, new_tokens, cache, drafter: Drafter, max_tokens: int, sampler) -> Iterator[int]:
    model = runtime.model
    first = runtime._sample_next(new_tokens, cache, sampler)
    yielded = 0
    in_cache = 0  # tokens produced whose keys and values the cache holds
    last = first  # the last token yielded
    pending = [first]
    drafter.append(pending)
    produced = 1
    try:
        while True:
            for last in pending:
                yielded += 1  # counted before: a caller may stop at this yield
                yield last
            if produced >= max_tokens:
                break
            started = time.perf_counter()
            draft = drafter.propose(max_tokens - produced - 1)
            drafted_at = time.perf_counter()
            with mx.stream(generation_stream):
                logits = model(mx.array([[last, *draft]], dtype=mx.uint32), cache=cache)
                chosen = mx.argmax(logits[0], axis=-1)
                mx.eval(chosen, [c.state for c in cache])
            out = chosen.tolist()
            accepted = 0
            while accepted < len(draft) and out[accepted] == draft[accepted]:
                accepted += 1
            if draft:
                trim_prompt_cache(cache, len(draft) - accepted)
                drafter.record(len(draft), accepted, drafted_at - started, time.perf_counter() - drafted_at)
            in_cache = produced + accepted  # ``last`` and the accepted drafts
            pending = out[: accepted + 1]
            drafter.append(pending)
            produced += len(pending)
    except GeneratorExit:
        _keep_yielded(runtime, cache, in_cache, yielded, last)
        raise
    _keep_yielded(runtime, cache, in_cache, yielded, last)


def _keep_yielded(runtime, cache: list, in_cache: int, yielded: int, last: int) -> None:
    """Make the cache hold exactly the tokens yielded: trim those a stopped caller did not
    take, or feed the last one taken (the last token of a step is not in the cache yet)."""
    if in_cache > yielded:
        trim_prompt_cache(cache, in_cache - yielded)
    elif in_cache == yielded - 1:
        runtime._sample_next([last], cache, None)
