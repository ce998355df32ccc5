"""Turns of different conversations decoded together: rows of mlx-lm's ``BatchGenerator``.

Each decode step advances every row by one token in one forward pass; a row whose prompt is
still being prefilled advances by one prefill chunk per step, after the decode, so that rows
already streaming wait at most one chunk between two tokens. A row enters with the cache the
store leased it (any tier) and the tokens that cache does not hold yet; it leaves on end of
turn or at its token limit (``step`` hands its cache back), or when the engine takes it out
(a stop string, a cancel: ``remove``). The cache that leaves is an ordinary per-conversation
KV cache holding exactly the row's tokens, as a serial turn leaves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from mlx_lm.generate import BatchGenerator

from .runtime import ModelRuntime
from .running import RunningTurn

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One row's token from a decode step; ``cache`` is set when the row left the batch (its
    cache then holds the prompt and every token of the row, this one included)."""

    run: RunningTurn
    token: int
    cache: Any = None


class Batch:
    """The rows decoding together (engine thread only)."""

    def __init__(self, runtime: ModelRuntime, max_rows: int):
        self._gen = BatchGenerator(
            runtime.model,
            stop_tokens=[[t] for t in sorted(runtime.eos_token_ids)],
            completion_batch_size=max_rows,
            prefill_batch_size=max_rows,
            prefill_step_size=runtime.prefill_step,
        )
        self._runtime = runtime
        self._rows: dict[int, RunningTurn] = {}
        self._uids: dict[int, int] = {}  # id(run) -> uid

    def __len__(self) -> int:
        return len(self._rows)

    def runs(self) -> list[RunningTurn]:
        return list(self._rows.values())

    def add(self, run: RunningTurn, held: Sequence[int], new: Sequence[int], cache: Any) -> None:
        """``run`` joins: ``cache`` holds the tokens ``held``; ``new`` (not empty) are fed next,
        then the row generates up to the run's remaining tokens."""
        [uid] = self._gen.insert(
            [list(new)],
            max_tokens=[run.max_tokens - len(run.generated)],
            caches=[cache],
            all_tokens=[list(held)],
            samplers=[self._runtime.sampler(run.sampling)],
        )
        self._rows[uid] = run
        self._uids[id(run)] = uid

    def step(self) -> list[Step]:
        """One decode step of the generating rows, then one prefill chunk of the others."""
        _, responses = self._gen.next()
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
        self._gen.close()

    def _forget(self, uid: int) -> None:
        run = self._rows.pop(uid)
        del self._uids[id(run)]
