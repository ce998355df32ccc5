"""The turns layer: everything a turn needs before the engine runs it.

An adapter (the gRPC service) hands over validated plain values. Here the conversation is
claimed in the registry, rendered by the chat template and tokenized on the calling handler
thread (only what changed since the conversation's last prompt is tokenized, see
``prompt.py``), a prompt that cannot fit the model's context is refused, and the engine gets
a ``Turn`` ready to run. A refused turn releases its claim.
"""

from __future__ import annotations

from typing import Any, Sequence

from .conversations import ConversationRegistry, TurnPlan
from .engine import Engine, Turn
from .errors import ContextOverflowError
from .runtime import Sampling


class Turns:
    """Prepares and submits turns for the adapters."""

    def __init__(self, engine: Engine, registry: ConversationRegistry):
        self.engine = engine
        self.registry = registry

    def submit(
        self,
        conversation_id: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        reset: bool,
        base_revision: int,
        sampling: Sampling,
        max_tokens: int,
        stop: Sequence[str] = (),
    ) -> Turn:
        """Claim, render, check and submit one turn; its events arrive on ``turn.events``.
        ``conversation_id`` empty: a one-shot turn, nothing is kept."""
        one_shot = not conversation_id
        if one_shot:
            plan = TurnPlan("", list(messages), list(tools), 0)
        else:
            plan = self.registry.begin_turn(
                conversation_id, messages, tools, reset=reset, base_revision=base_revision
            )
        try:
            turn = self._prepare(plan, sampling, max_tokens, tuple(stop), one_shot)
            self.engine.submit(turn)
        except BaseException:
            if not one_shot:
                self.registry.abandon_turn(plan)
            raise
        return turn

    def cancel(self, turn: Turn) -> None:
        """The turn's client went away (or the RPC ended): stop it, and let a next turn of
        the conversation wait for it to wind down instead of being refused."""
        turn.cancel()
        if not turn.one_shot:
            self.registry.cancel_turn(turn.plan)

    def _prepare(
        self, plan: TurnPlan, sampling: Sampling, max_tokens: int, stop: tuple[str, ...], one_shot: bool
    ) -> Turn:
        runtime = self.engine.runtime
        renderer = runtime.renderer
        limit = runtime.context_length
        if renderer.min_tokens(plan.messages) >= limit:
            # Refused before tokenizing: a huge request costs a sum of lengths, not seconds.
            raise ContextOverflowError(
                f"the messages take more than {limit} tokens, the model's context window"
            )
        prompt = renderer.render(
            plan.messages, plan.tools, previous=plan.previous_prompt, continues=plan.continues
        )
        if len(prompt) >= limit:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the model's context window is {limit}"
            )
        boundary = None
        if runtime.needs_checkpoints and not one_shot:
            # Where the generation prompt starts: a copy of the cache there lets a regenerated
            # or rewritten reply cost only that reply (for caches that cannot be trimmed).
            head = renderer.render(
                plan.messages, plan.tools, previous=prompt, continues=True, generation_prompt=False
            )
            if len(head) < len(prompt) and prompt.ids[: len(head)] == head.ids:
                boundary = len(head)
        return Turn(plan, prompt, sampling, max_tokens, stop, one_shot=one_shot, boundary=boundary)
