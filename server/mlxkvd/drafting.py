"""A draft model (``--draft-model``): a small model with the target's vocabulary proposes the
next tokens of a greedy turn, and ``speculative.generate`` verifies them several per forward
pass of the target.

The draft model keeps a KV cache per conversation, as the target does, so that a turn drafts
after prefilling only what the draft has not seen: its caches live in a memory-only
``CacheStore`` of their own (the same lookup rules: a conversation's own cache, else the
longest shared prefix), under a share of the daemon's memory budget proportional to its KV
bytes per token (``DraftModel.share``). They are not written to disk: after a restart or an
eviction the draft catches up on the history once, at its first draft.
"""

from __future__ import annotations

import logging
from typing import Sequence

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .kvcache import MlxCacheOps
from .runtime import ModelRuntime
from .speculative import Drafter
from .store import CacheStore, Lease

log = logging.getLogger("mlxkvd.drafting")

_SHARE_PROBE_TOKENS = 4096  # KV bytes compared at this length (both grow linearly)


class DraftModel:
    """The draft model and its per-conversation caches (engine thread, except ``misfit``)."""

    def __init__(self, runtime: ModelRuntime, max_bytes: int):
        self.runtime = runtime
        self.store = CacheStore(MlxCacheOps(), fingerprint=runtime.fingerprint, max_bytes=max_bytes)
        self._misfits: dict[str, str | None] = {}

    @property
    def name(self) -> str:
        return self.runtime.name

    def misfit(self, target: ModelRuntime) -> str | None:
        """Why this model cannot draft for ``target``; None when it can."""
        if target.fingerprint not in self._misfits:
            self._misfits[target.fingerprint] = _misfit(self.runtime, target)
        return self._misfits[target.fingerprint]

    def share(self, max_bytes: int, target: ModelRuntime) -> int:
        """The part of a memory budget of ``max_bytes`` that the draft's caches get: what
        they take beside ``target``'s caches of the same conversations."""
        draft = self.runtime.kv_nbytes(_SHARE_PROBE_TOKENS)
        return max_bytes * draft // (draft + target.kv_nbytes(_SHARE_PROBE_TOKENS))

    def set_memory_budget(self, max_bytes: int) -> None:
        self.store.set_memory_budget(max_bytes)

    def proposer(self, key: str | None, tokens: Sequence[int], room: int, cancelled=None) -> "DraftProposer":
        """A drafter for one turn of conversation ``key`` whose prompt is ``tokens``, which
        may generate ``room`` more. The draft prefills what it has not cached of the prompt
        now, before the turn's first token (``cancelled`` stops it between chunks)."""
        self.runtime.ensure_loaded()
        lease = self.store.lease(key, tokens, reserve_bytes=self.runtime.kv_nbytes(len(tokens) + room))
        proposer = DraftProposer(self.runtime, lease, tokens)
        try:
            proposer.catch_up(cancelled)
        except BaseException:
            proposer.close()
            raise
        return proposer

    def unload(self) -> None:
        """Free the weights and the caches (the daemon unloads when idle)."""
        self.store.clear()
        self.runtime.unload()


class DraftProposer(Drafter):
    """Drafts greedily with the draft model. Its cache holds ``tokens[:fed]``: each draft
    first feeds what it has not seen (the prompt's rest at the first draft, later the tokens
    accepted since), then drafts one token per pass, and trims the drafts off again."""

    def __init__(self, runtime: ModelRuntime, lease: Lease, tokens: Sequence[int]):
        super().__init__()
        self._rt = runtime
        self._lease: Lease | None = lease
        self._cache = lease.lookup.cache if lease.lookup.cache is not None else runtime.make_cache()
        self._fed = self.reused = lease.lookup.cached_tokens
        self._tokens = list(tokens)
        self._consistent = True  # the cache holds exactly tokens[:fed]

    def append(self, tokens: Sequence[int]) -> None:
        self._tokens.extend(tokens)

    def catch_up(self, cancelled=None) -> None:
        """Feed the draft every token it has not seen."""
        self._consistent = False
        self._fed += self._rt.prefill(self._tokens[self._fed :], self._cache, cancelled)
        self._consistent = True

    def _draft(self, k: int) -> list[int]:
        rt, cache = self._rt, self._cache
        unseen = self._tokens[self._fed :]  # the pending token, after the accepted ones
        self._consistent = False
        rt.prefill(unseen[:-1], cache)
        self._fed += len(unseen) - 1
        with mx.stream(generation_stream):
            token = mx.array([unseen[-1:]], dtype=mx.uint32)
            drafts = []
            for _ in range(k):  # built lazily, evaluated once
                token = mx.argmax(rt.model(token, cache=cache)[:, -1:, :], axis=-1).astype(mx.uint32)
                drafts.append(token)
            draft = mx.concatenate(drafts, axis=1)
            mx.eval(draft, [c.state for c in cache])
        trim_prompt_cache(cache, k)  # the pending token and the drafts but the last
        self._consistent = True
        return draft[0].tolist()

    def close(self) -> None:
        """Keep the cache for the conversation's next turn (or drop it if a draft failed)."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if not self._consistent or self._fed == 0:
            lease.release()
            return
        try:
            lease.checkin(self._tokens[: self._fed], self._cache)
        except Exception:  # noqa: BLE001 - a lost draft cache only costs a catch-up
            log.exception("keeping the draft model's cache failed")
            lease.release()


def _misfit(draft: ModelRuntime, target: ModelRuntime) -> str | None:
    if draft.tokenizer.vocab != target.tokenizer.vocab:
        return (f"draft model {draft.name} and model {target.name} have different vocabularies; "
                "a draft model must share its target's tokenizer")
    if not can_trim_prompt_cache(draft.make_cache()):
        return f"draft model {draft.name}'s cache cannot be trimmed past rejected drafts"
    return None
