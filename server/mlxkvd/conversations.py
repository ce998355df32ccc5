"""The conversation registry: each conversation's messages, tools and revision.

Pure Python and thread-safe: gRPC handler threads check revisions and claim a conversation
here before they submit a turn, so that a stale delta or a second concurrent turn is refused
without waiting for the engine. The KV caches themselves live in the cache store.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import ConversationBusyError, ConversationNotFoundError, StaleRevisionError
from .prompt import Prompt

Message = dict[str, Any]

# How long a new turn waits for a cancelled turn of the same conversation to wind down (one
# decode step, or its place in the engine's queue) before it is refused as busy.
CANCELLED_TURN_WAIT_S = 60.0
# Conversations remembered at most; beyond that the least recently used one is forgotten
# (with its caches). Its client resends the history if it comes back.
DEFAULT_MAX_CONVERSATIONS = 10_000


@dataclass
class ConversationRecord:
    conversation_id: str
    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    revision: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # The last turn's rendered prompt: the next turn tokenizes only what differs from it.
    prompt: Prompt | None = field(default=None, repr=False)
    # The model of its last turn: its name, and the fingerprint its prompt's ids belong to.
    model: str = ""
    fingerprint: str = ""


@dataclass
class _Claim:
    """A conversation's turn in flight; ``cancelled`` once its client went away."""

    plan: "TurnPlan"
    cancelled: bool = False
    deleted: bool = False  # the conversation was deleted while the turn ran: do not commit


@dataclass(frozen=True)
class TurnPlan:
    """What one turn renders: the whole history including the new messages."""

    conversation_id: str
    messages: list[Message]
    tools: list[dict[str, Any]]
    base_revision: int
    previous_prompt: Prompt | None = None  # the conversation's last prompt
    continues: bool = False  # ``messages`` begin with those ``previous_prompt`` rendered
    model: str = ""  # the model this turn runs on (name) and its fingerprint
    fingerprint: str = ""
    previous_model: str = ""  # the conversation's last turn ran on another model: this one


class ConversationRegistry:
    def __init__(self, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        self.max_conversations = max_conversations
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._records: OrderedDict[str, ConversationRecord] = OrderedDict()  # least recent first
        self._busy: dict[str, _Claim] = {}
        self._forgotten: list[str] = []  # evicted records whose caches are still to be dropped

    def begin_turn(
        self,
        conversation_id: str,
        messages: list[Message],
        tools: list[dict[str, Any]],
        *,
        reset: bool,
        base_revision: int,
        model: str = "",
        fingerprint: str = "",
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
            plan = self._plan(conversation_id, messages, tools, reset, base_revision, model, fingerprint)
            self._busy[conversation_id] = _Claim(plan)
            return plan

    def plan_draft(
        self, conversation_id: str, messages: list[Message], tools: list[dict[str, Any]], *, reset: bool,
        base_revision: int, model: str = "", fingerprint: str = "",
    ) -> TurnPlan:
        """The history a draft of the next turn renders (a warm-up), checked as ``begin_turn``
        checks a turn's, without claiming the conversation: nothing will be committed.
        ConversationBusyError while a turn is in flight (its cache is out)."""
        with self._lock:
            if conversation_id in self._busy:
                raise ConversationBusyError(f"conversation {conversation_id!r} has a turn in flight")
            return self._plan(conversation_id, messages, tools, reset, base_revision, model, fingerprint)

    def _plan(
        self, conversation_id: str, messages: list[Message], tools: list[dict[str, Any]], reset: bool,
        base_revision: int, model: str, fingerprint: str,
    ) -> TurnPlan:
        record = self._records.get(conversation_id)
        previous = record.prompt if record is not None else None
        previous_model = ""
        if record is not None and record.fingerprint and record.fingerprint != fingerprint:
            # Its ids are another tokenizer's: the prompt is tokenized whole.
            previous, previous_model = None, record.model
        on = dict(model=model, fingerprint=fingerprint, previous_model=previous_model)
        if reset:
            revision = record.revision if record is not None else 0
            return TurnPlan(conversation_id, list(messages), list(tools), revision, previous, **on)
        if record is None:
            raise StaleRevisionError(
                f"unknown conversation {conversation_id!r}: resend the history with reset"
            )
        if record.revision != base_revision:
            raise StaleRevisionError(
                f"conversation {conversation_id!r} is at revision {record.revision}, "
                f"not {base_revision}: resend the history with reset"
            )
        return TurnPlan(
            conversation_id,
            record.messages + list(messages),
            list(tools) if tools else list(record.tools),
            record.revision,
            previous,
            continues=previous is not None,
            **on,
        )

    def commit_turn(self, plan: TurnPlan, reply: Message, prompt: Prompt | None = None) -> int:
        """Record a completed turn (``prompt``: what it rendered); returns the new revision.
        Raises ConversationNotFoundError if the conversation was deleted during the turn."""
        with self._lock:
            claim = self._busy.get(plan.conversation_id)
            self._release(plan)
            if claim is not None and claim.plan is plan and claim.deleted:
                raise ConversationNotFoundError(
                    f"conversation {plan.conversation_id!r} was deleted while this turn ran; "
                    "nothing was kept"
                )
            record = self._records.get(plan.conversation_id)
            if record is None:
                record = self._records[plan.conversation_id] = ConversationRecord(
                    plan.conversation_id
                )
                self._evict_over_capacity()
            self._records.move_to_end(plan.conversation_id)
            record.messages = plan.messages + [reply]
            record.tools = plan.tools
            record.prompt = prompt
            record.model, record.fingerprint = plan.model, plan.fingerprint
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

    def peek(self, conversation_id: str) -> tuple[list[Message], list[dict[str, Any]], int] | None:
        """``(messages, tools, revision)`` of a conversation, or None; no copies (the lists are
        replaced, never changed in place, by each commit)."""
        with self._lock:
            record = self._records.get(conversation_id)
            return None if record is None else (record.messages, record.tools, record.revision)

    def list(self) -> list[ConversationRecord]:
        with self._lock:
            return [ConversationRecord(**vars(r)) for r in self._records.values()]

    def delete(self, conversation_id: str) -> None:
        """Forget a conversation; a turn of it in flight will not be committed."""
        with self._lock:
            claim = self._busy.get(conversation_id)
            if claim is not None:
                claim.deleted = True
            if self._records.pop(conversation_id, None) is None and claim is None:
                raise ConversationNotFoundError(f"no conversation {conversation_id!r}")

    def pop_forgotten(self) -> list[str]:
        """Conversations evicted to stay within ``max_conversations`` since the last call:
        their caches are to be dropped."""
        with self._lock:
            forgotten, self._forgotten = self._forgotten, []
            return forgotten

    def _evict_over_capacity(self) -> None:
        while len(self._records) > self.max_conversations:
            victim = next((k for k in self._records if k not in self._busy), None)
            if victim is None:
                return
            del self._records[victim]
            self._forgotten.append(victim)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
