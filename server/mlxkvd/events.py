"""What the engine takes and gives: a ``Turn`` in, its events out (``Started``, then ``Text``
any number of times, then ``Finished`` or ``Failed``), on the turn's own queue. A warm-up is a
``Turn`` too (``warm``): its one event is ``Warmed`` or ``Failed``."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .conversations import TurnPlan
from .prompt import Prompt
from .reply import ToolCall, ToolFormat
from .runtime import Sampling


# Events a turn emits, in order: Started, then Text*, then Finished or Failed.
@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int
    cache_source: str
    cache_miss_reason: str
    tools_ignored: bool = False  # tools were sent, the chat template renders none of them


@dataclass(frozen=True)
class Text:
    text: str
    token_ids: tuple[int, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # completed with this text; their text is not in it


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "stop_string" | "tool_calls"
    text: str  # the reply without its tool calls' text
    tool_calls: tuple[ToolCall, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float
    queue_s: float
    revision: int
    drafted_tokens: int = 0  # speculative decoding: draft tokens verified, and accepted
    accepted_tokens: int = 0


@dataclass(frozen=True)
class Warmed:
    prompt_tokens: int
    cached_tokens: int  # in the cache when the warm-up started
    prefilled_tokens: int
    superseded: bool  # stopped early: a newer warm-up, a turn of the conversation, a cancel


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Turn:
    """One submitted assistant turn. ``conversation_id`` empty means one-shot. ``boundary``:
    where the generation prompt starts, for a model whose caches need turn checkpoints."""

    plan: TurnPlan
    prompt: Prompt
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    one_shot: bool = False
    boundary: int | None = None
    tool_format: ToolFormat | None = None  # where tool calls are looked for (None: they are not)
    reply_prefix: str = ""  # the end of the prompt that is the reply's start (a forced call)
    tools_ignored: bool = False
    warm: bool = False  # a warm-up: prefill the prompt, generate nothing, commit nothing
    context_length: int = 0  # its context window, when capped below the model's (0: not)
    speculative: str = "off"  # "prompt-lookup": drafts from the conversation (greedy turns)
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    # Tokens generated so far (engine thread), and how many there were at cancel().
    generated: int = 0
    generated_at_cancel: int | None = None

    def context_length_of(self, runtime: Any) -> int:
        """Its context window on ``runtime``: the model's, or the turn's cap below it."""
        return min(self.context_length or runtime.context_length, runtime.context_length)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
        self.cancelled.set()
