"""The conversation registry: each conversation's messages, tools and revision.

Pure Python and thread-safe: gRPC handler threads check revisions and claim a conversation
here before they submit a turn, so that a stale delta or a second concurrent turn is refused
without waiting for the engine. The KV caches themselves live in the cache store.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConversationBusyError, ConversationNotFoundError, StaleRevisionError

Message = dict[str, Any]

# How long a new turn waits for a cancelled turn of the same conversation to wind down (one
# decode step, or its place in the engine's queue) before it is refused as busy.
CANCELLED_TURN_WAIT_S = 60.0


@dataclass
class ConversationRecord:
    conversation_id: str
    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    revision: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class _Claim:
    """A conversation's turn in flight; ``cancelled`` once its client went away."""

    plan: "TurnPlan"
    cancelled: bool = False


@dataclass(frozen=True)
class TurnPlan:
    """What one turn renders: the whole history including the new messages."""

    conversation_id: str
    messages: list[Message]
    tools: list[dict[str, Any]]
    base_revision: int


class ConversationRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._records: dict[str, ConversationRecord] = {}
        self._busy: dict[str, _Claim] = {}

    def begin_turn(
        self,
        conversation_id: str,
        messages: list[Message],
        tools: list[dict[str, Any]],
        *,
        reset: bool,
        base_revision: int,
        wait_cancelled_s: float = CANCELLED_TURN_WAIT_S,
    ) -> TurnPlan:
        """Claim the conversation for one turn and return the full history to render.

        Raises ConversationBusyError when a turn is already in flight and StaleRevisionError
        when a delta does not build on the revision held here. A turn in flight whose client
        cancelled it is waited for (up to ``wait_cancelled_s``): a client that stops an
        answer and sends its next message at once must not be refused.
        """
        deadline = time.monotonic() + wait_cancelled_s
        with self._lock:
            while (claim := self._busy.get(conversation_id)) is not None:
                remaining = deadline - time.monotonic()
                if not claim.cancelled or remaining <= 0:
                    raise ConversationBusyError(
                        f"conversation {conversation_id!r} already has a turn in flight"
                    )
                self._released.wait(remaining)
            record = self._records.get(conversation_id)
            if reset:
                plan = TurnPlan(conversation_id, list(messages), list(tools), base_revision=0)
                if record is not None:
                    plan = TurnPlan(conversation_id, list(messages), list(tools), record.revision)
            elif record is None:
                raise StaleRevisionError(
                    f"unknown conversation {conversation_id!r}: resend the history with reset"
                )
            elif record.revision != base_revision:
                raise StaleRevisionError(
                    f"conversation {conversation_id!r} is at revision {record.revision}, "
                    f"not {base_revision}: resend the history with reset"
                )
            else:
                plan = TurnPlan(
                    conversation_id,
                    record.messages + list(messages),
                    list(tools) if tools else list(record.tools),
                    record.revision,
                )
            self._busy[conversation_id] = _Claim(plan)
            return plan

    def commit_turn(self, plan: TurnPlan, reply: Message) -> int:
        """Record a completed turn; returns the new revision."""
        with self._lock:
            self._release(plan)
            record = self._records.get(plan.conversation_id)
            if record is None:
                record = self._records[plan.conversation_id] = ConversationRecord(
                    plan.conversation_id
                )
            record.messages = plan.messages + [reply]
            record.tools = plan.tools
            record.revision = max(record.revision, plan.base_revision) + 1
            record.updated_at = time.time()
            return record.revision

    def abandon_turn(self, plan: TurnPlan) -> None:
        """Release the conversation after a failed or cancelled turn; nothing is committed."""
        with self._lock:
            self._release(plan)

    def cancel_turn(self, plan: TurnPlan) -> None:
        """``plan``'s client went away: its turn will be abandoned, so a next turn of the
        conversation waits for that instead of being refused. A no-op once it has ended."""
        with self._lock:
            claim = self._busy.get(plan.conversation_id)
            if claim is not None and claim.plan is plan:
                claim.cancelled = True

    def _release(self, plan: TurnPlan) -> None:
        claim = self._busy.get(plan.conversation_id)
        if claim is not None and claim.plan is plan:
            del self._busy[plan.conversation_id]
            self._released.notify_all()

    def get(self, conversation_id: str) -> ConversationRecord:
        with self._lock:
            record = self._records.get(conversation_id)
            if record is None:
                raise ConversationNotFoundError(f"no conversation {conversation_id!r}")
            return ConversationRecord(**vars(record))

    def list(self) -> list[ConversationRecord]:
        with self._lock:
            return [ConversationRecord(**vars(r)) for r in self._records.values()]

    def delete(self, conversation_id: str) -> None:
        with self._lock:
            if self._records.pop(conversation_id, None) is None:
                raise ConversationNotFoundError(f"no conversation {conversation_id!r}")

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
