"""The turns layer: everything a turn needs before the engine runs it.

Adapters (the gRPC service, the HTTP APIs) hand over plain values: messages as dicts in the
shape chat templates take (``check_messages``). Here the conversation is found (``submit`` names
it; ``submit_stateless`` maps a whole resent history to one, see ``sessions.py``) and claimed in
the registry, rendered by the chat template and tokenized on the calling handler thread (only
what changed since the conversation's last prompt is tokenized, see ``prompt.py``), a prompt
that cannot fit the model's context is refused, tool choice is applied, and the engine gets a
``Turn`` ready to run. A refused turn releases its claim.

Every turn names its model (``model``: "" for the resident one); ``models.ModelHost`` holds it
resident from the render to the submission, switching to it first if need be, so that a
turn's ids are always its model's.

A warm-up (``warm``) is planned the same way, from a draft of the next turn, without claiming
the conversation (it commits nothing). A newer warm-up of a conversation, or a turn of it,
supersedes (cancels) the warm-up of it still running: the turn's lease then comes after the
warm-up has checked its cache in, on the one engine thread.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Sequence

from . import params
from .conversations import ConversationRegistry, TurnPlan
from .engine import Engine, Turn
from .errors import ContextOverflowError, ConversationBusyError, InvalidRequestError, StaleRevisionError
from .events import Failed, Warmed
from .models import ModelHost
from .runtime import ModelRuntime, Sampling
from .sessions import Sessions, new_conversation_id

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("", "auto", "none", "required")


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """``InvalidRequestError`` unless every message is ``{"role", "content": str}`` with, for
    an assistant, optional ``tool_calls`` ``[{"id", "type": "function", "function": {"name",
    "arguments": dict}}]`` and, for a tool result, an optional ``tool_call_id`` and ``name``."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m["role"] != "assistant":
            raise InvalidRequestError(f"messages[{i}]: only assistant messages carry tool calls")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
                raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] needs a function name")
            if not isinstance(function.get("arguments"), dict):
                raise InvalidRequestError(f"messages[{i}].tool_calls[{j}].arguments must be a JSON object")


class Turns:
    """Prepares and submits turns for the adapters."""

    def __init__(self, engine: Engine, registry: ConversationRegistry, models: ModelHost):
        self.engine = engine
        self.registry = registry
        self.models = models
        self.default_speculative = "off"  # mlxkvd serve --speculative (SIGHUP may change it)
        self.draft_model: str | None = None  # the draft model's name (--draft-model)
        self.sessions = Sessions(registry)
        self._warm_ups: dict[str, Turn] = {}  # conversation id -> its warm-up in flight
        self._warm_lock = threading.Lock()

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
        tool_choice: str = "auto",
        model: str = "",
        context_length: int = 0,
        clamp_max_tokens: bool = False,
        speculative: str = "",
    ) -> Turn:
        """Claim, render, check and submit one turn; its events arrive on ``turn.events``.
        ``conversation_id`` empty: a one-shot turn, nothing is kept. ``tool_choice``: "auto"
        (or ""), "none" (tools rendered, calls not parsed), "required", or a tool's name.
        ``model``: a catalogue name or directory ("": the resident model); ``context_length``:
        a cap of the turn's context window (0: none). ``max_tokens`` past the window is
        refused, or with ``clamp_max_tokens`` cut to it. ``speculative``: "off",
        "prompt-lookup" or "" (the daemon's setting)."""
        check_messages(messages)
        speculative = self._speculative(speculative)
        one_shot = not conversation_id
        with self.models.use(model) as runtime:
            on = {"model": runtime.name, "fingerprint": runtime.fingerprint}
            if one_shot:
                plan = TurnPlan("", list(messages), list(tools), 0, **on)
            else:
                self._supersede(conversation_id)
                plan = self.registry.begin_turn(
                    conversation_id, messages, tools, reset=reset, base_revision=base_revision, **on
                )
            try:
                limit = self.models.context_length(runtime, context_length)
                max_tokens = params.max_tokens(min(max_tokens, limit) if clamp_max_tokens else max_tokens, limit)
                turn = self._prepare(runtime, plan, sampling, max_tokens, tuple(stop), one_shot, tool_choice,
                                     limit=limit)
                turn.speculative = speculative
                self.engine.submit(turn)
            except BaseException:
                if not one_shot:
                    self.registry.abandon_turn(plan)
                raise
        return turn

    def submit_stateless(
        self,
        session: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        **turn: Any,
    ) -> Turn:
        """A turn of an API that resends the whole history: ``messages`` continue the session's
        conversation that stored their beginning (in place), else start a new one (see
        ``sessions.py``). ``turn``: ``submit``'s keyword arguments but ``reset`` and
        ``base_revision``. ``turn.plan.conversation_id`` names the conversation used."""
        check_messages(messages)
        found = self.sessions.find(session, messages, tools)
        if found is not None:
            try:
                submitted = self.submit(found.conversation_id, messages[found.stored:], tools,
                                        reset=False, base_revision=found.revision, **turn)
                self.sessions.remember(session, found.conversation_id)
                return submitted
            except (ConversationBusyError, StaleRevisionError):
                pass  # a concurrent request took it: this one branches
        conversation_id = new_conversation_id()
        submitted = self.submit(conversation_id, messages, tools, reset=True, base_revision=0, **turn)
        self.sessions.remember(session, conversation_id)
        return submitted

    def warm(
        self,
        conversation_id: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        reset: bool,
        base_revision: int,
        model: str = "",
    ) -> Turn:
        """Submit a warm-up of a draft of the conversation's next turn: ``messages`` and the
        rest as ``submit`` takes them (``conversation_id`` empty: an anonymous one, whose cache
        a later conversation can start from). ``wait_warm`` gives its outcome."""
        check_messages(messages)
        with self.models.use(model) as runtime:
            on = {"model": runtime.name, "fingerprint": runtime.fingerprint}
            if conversation_id:
                plan = self.registry.plan_draft(conversation_id, messages, tools, reset=reset,
                                                base_revision=base_revision, **on)
            else:
                plan = TurnPlan("", list(messages), list(tools), 0, **on)
            turn = self._prepare(runtime, plan, params.sampling(), 1, (), not conversation_id, "auto",
                                 warm=True, limit=self.models.context_length(runtime))
            if conversation_id:
                self._supersede(conversation_id, turn)
            self.engine.submit(turn)
        return turn

    def warm_stateless(self, session: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                       model: str = "") -> Turn:
        """A warm-up for an API that resends the whole history: onto the session's
        conversation that stored the draft's beginning, else an anonymous one."""
        check_messages(messages)
        found = self.sessions.find(session, messages, tools)
        if found is None:
            return self.warm("", messages, tools, reset=True, base_revision=0, model=model)
        return self.warm(found.conversation_id, messages[found.stored:], tools, reset=False,
                         base_revision=found.revision, model=model)

    def wait_warm(self, turn: Turn) -> Warmed:
        """The warm-up's outcome, once it has ended; raises its error if it failed."""
        event = turn.events.get()
        with self._warm_lock:
            if self._warm_ups.get(turn.plan.conversation_id) is turn:
                del self._warm_ups[turn.plan.conversation_id]
        if isinstance(event, Failed):
            raise event.error
        return event

    def _supersede(self, conversation_id: str, by: Turn | None = None) -> None:
        """Cancel the conversation's warm-up in flight, if any; ``by`` is the new one."""
        with self._warm_lock:
            old = self._warm_ups.pop(conversation_id, None)
            if by is not None:
                self._warm_ups[conversation_id] = by
        if old is not None:
            old.cancel()

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str = "") -> int:
        """Tokens of the prompt these messages render to (with the generation prompt) on
        ``model`` (switched to if need be: its tokenizer counts)."""
        check_messages(messages)
        with self.models.use(model) as runtime:
            self._check_size(runtime, messages, self.models.context_length(runtime))
            return len(runtime.renderer.render(messages, tools))

    def _speculative(self, mode: str) -> str:
        if mode in ("", "off", "prompt-lookup"):
            return mode or self.default_speculative
        if mode == "draft":
            if self.draft_model is None:
                raise InvalidRequestError("speculative 'draft' needs a draft model: start mlxkvd with "
                                          "--draft-model NAME|DIR ('prompt-lookup' needs none)")
            return mode
        raise InvalidRequestError(f"speculative must be 'off', 'prompt-lookup' or 'draft', got {mode!r}")

    def cancel(self, turn: Turn) -> None:
        """The turn's client went away (or the RPC ended): stop it, and let a next turn of
        the conversation wait for it to wind down instead of being refused."""
        turn.cancel()
        if not turn.one_shot:
            self.registry.cancel_turn(turn.plan)

    @staticmethod
    def _check_size(runtime: ModelRuntime, messages: Sequence[dict[str, Any]], limit: int) -> None:
        if runtime.renderer.min_tokens(messages) >= limit:
            # Refused before tokenizing: a huge request costs a sum of lengths, not seconds.
            raise ContextOverflowError(
                f"the messages take more than {limit} tokens, the {_window(runtime, limit)}"
            )

    def _prepare(
        self, runtime: ModelRuntime, plan: TurnPlan, sampling: Sampling, max_tokens: int, stop: tuple[str, ...],
        one_shot: bool, tool_choice: str, *, limit: int, warm: bool = False,
    ) -> Turn:
        renderer = runtime.renderer
        self._check_size(runtime, plan.messages, limit)
        tools_ignored = bool(plan.tools) and not renderer.renders_tools
        forced = self._forced_call(runtime, tool_choice, plan.tools, tools_ignored)
        prompt = renderer.render(
            plan.messages, plan.tools, previous=plan.previous_prompt, continues=plan.continues
        )
        if forced:
            # The reply starts with the call's opening, written into the prompt.
            grown = renderer.tokenize(prompt.text + forced, prompt, guarded=prompt.guarded)
            prompt = dataclasses.replace(prompt, text=grown.text, ids=grown.ids, marks=grown.marks)
        if len(prompt) >= limit:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the {_window(runtime, limit)} is {limit}"
            )
        boundary = None
        if runtime.needs_checkpoints and not one_shot and not warm:
            # Where the generation prompt starts: a copy of the cache there lets a regenerated
            # or rewritten reply cost only that reply (for caches that cannot be trimmed).
            head = renderer.render(
                plan.messages, plan.tools, previous=prompt, continues=True, generation_prompt=False
            )
            if len(head) < len(prompt) and prompt.ids[: len(head)] == head.ids:
                boundary = len(head)
        parse = plan.tools and tool_choice != "none" and not tools_ignored
        return Turn(plan, prompt, sampling, max_tokens, stop, one_shot=one_shot, boundary=boundary,
                    tool_format=runtime.tool_format if parse else None, reply_prefix=forced,
                    tools_ignored=tools_ignored, warm=warm,
                    context_length=limit if limit < runtime.context_length else 0)

    @staticmethod
    def _forced_call(runtime: ModelRuntime, tool_choice: str, tools: list[dict[str, Any]], tools_ignored: bool) -> str:
        """The text a reply must start with for ``tool_choice`` ("" when it is free)."""
        if tool_choice in ("", "auto", "none"):
            return ""
        names = [t["name"] for t in tools]
        if tool_choice != "required" and tool_choice not in names:
            raise InvalidRequestError(
                f"tool_choice {tool_choice!r} is not 'auto', 'none', 'required' nor the name of "
                f"a tool sent ({', '.join(names) or 'none sent'})"
            )
        tool_format = runtime.tool_format
        if tools_ignored or tool_format is None:
            raise InvalidRequestError(
                f"tool_choice {tool_choice!r} needs a tool call, but the model's chat template "
                + ("renders no tools" if tools_ignored else "has no tool-call format mlx-lm can parse")
                + " (mlxkvd serve --chat-template can replace it)"
            )
        if tool_choice == "required":
            return tool_format.start
        if tool_format.start == "<tool_call>" and tool_format.parse.__module__.endswith("json_tools"):
            # No space at the end: BPE vocabularies join it to the next token (' {').
            return tool_format.start + '\n{"name": ' + json.dumps(tool_choice) + ', "arguments":'
        return tool_format.start


def _window(runtime: ModelRuntime, limit: int) -> str:
    """How an error names the context window ``limit``."""
    if limit < runtime.context_length:
        return f"context window this turn gets (capped below the model's {runtime.context_length})"
    return "model's context window"
