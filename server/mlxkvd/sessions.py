"""Conversation identity for APIs that resend the whole history on every call.

OpenAI's and Anthropic's HTTP APIs have no conversation id: each request carries every message.
A session key, when the client sends one (OpenAI ``prompt_cache_key`` or ``user``, Anthropic
``metadata.user_id`` or Claude Code's session header), groups the conversations of one client;
requests without one share one anonymous pool. Within its session a request continues the
conversation whose stored messages (and tools) begin it, the longest if several do: that
conversation's cache is extended in place. Otherwise it starts a new conversation, whose first
turn copies the longest prefix any stored cache shares with it (the store's shared-prefix
lookup), so that a branch, an edit or a subagent never takes over another conversation's cache.

Each session keeps its most recently used conversations (an agent and its subagents share one
key): up to ``max_per_session``; older ones leave the session, not the store.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from .conversations import ConversationRegistry

DEFAULT_MAX_PER_SESSION = 64
DEFAULT_MAX_SESSIONS = 1024


@dataclass(frozen=True)
class Continuation:
    """A stored conversation a request continues: its first ``stored`` messages are stored."""

    conversation_id: str
    stored: int
    revision: int


def new_conversation_id() -> str:
    return "http-" + uuid.uuid4().hex[:20]


class Sessions:
    """Session key -> its conversations, most recently used first. Thread-safe."""

    def __init__(
        self,
        registry: ConversationRegistry,
        *,
        max_per_session: int = DEFAULT_MAX_PER_SESSION,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ):
        self._registry = registry
        self._max_per_session = max_per_session
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def find(
        self, session: str, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
    ) -> Continuation | None:
        """The session's conversation whose stored messages begin ``messages`` (and leave at
        least one new one), with the same tools; the longest such, else None."""
        with self._lock:
            ids = list(self._sessions.get(session, ()))
        best: Continuation | None = None
        for conversation_id in reversed(ids):  # most recent first
            held = self._registry.peek(conversation_id)
            if held is None:  # forgotten by the registry
                self._forget(session, conversation_id)
                continue
            stored, stored_tools, revision = held
            n = len(stored)
            if best is not None and n <= best.stored:
                continue
            if n < len(messages) and stored_tools == list(tools) and stored == list(messages[:n]):
                best = Continuation(conversation_id, n, revision)
        return best

    def remember(self, session: str, conversation_id: str) -> None:
        """``conversation_id`` is the session's most recently used conversation."""
        with self._lock:
            conversations = self._sessions.pop(session, None) or OrderedDict()
            conversations.pop(conversation_id, None)
            conversations[conversation_id] = None
            while len(conversations) > self._max_per_session:
                conversations.popitem(last=False)
            self._sessions[session] = conversations
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)

    def _forget(self, session: str, conversation_id: str) -> None:
        with self._lock:
            conversations = self._sessions.get(session)
            if conversations is not None:
                conversations.pop(conversation_id, None)
