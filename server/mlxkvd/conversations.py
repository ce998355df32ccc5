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


@dataclass
class ConversationRecord:
    conversation_id: str
    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    revision: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


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
        self._records: dict[str, ConversationRecord] = {}
        self._busy: set[str] = set()

    def begin_turn(
        self,
        conversation_id: str,
        messages: list[Message],
        tools: list[dict[str, Any]],
        *,
        reset: bool,
        base_revision: int,
    ) -> TurnPlan:
        """Claim the conversation for one turn and return the full history to render.

        Raises ConversationBusyError when a turn is already in flight and StaleRevisionError
        when a delta does not build on the revision held here.
        """
        with self._lock:
            if conversation_id in self._busy:
                raise ConversationBusyError(
                    f"conversation {conversation_id!r} already has a turn in flight"
                )
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
            self._busy.add(conversation_id)
            return plan

    def commit_turn(self, plan: TurnPlan, reply: Message) -> int:
        """Record a completed turn; returns the new revision."""
        with self._lock:
            self._busy.discard(plan.conversation_id)
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
            self._busy.discard(plan.conversation_id)

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
