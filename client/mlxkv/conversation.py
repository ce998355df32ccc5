"""``Conversation``: a transcript kept client-side, synced with the daemon by revision, and
``Turn``, the result of one assistant turn.

The conversation protocol (see DESIGN.md): the first turn sends the whole history with
``reset=True``; later turns send only the new messages on top of ``base_revision``. When the
daemon has lost the conversation (restart, eviction, stale revision) it answers
FAILED_PRECONDITION and the turn is re-sent once with the full transcript, transparently: the
caller only sees ``Turn.resent``.

Tool calls: a turn that calls tools ends with ``finish_reason == "tool_calls"`` and
``Turn.tool_calls``; the transcript records the assistant message with its ``tool_calls``
exactly as the daemon stores it, and ``send_tool_results`` answers them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from mlxkv.convert import (
    CACHE_SOURCE_NAMES,
    FINISH_REASON_NAMES,
    message_from_proto,
    message_to_proto,
    sampling_to_proto,
    tool_to_proto,
)
from mlxkv.errors import MlxkvError
from mlxkv.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from mlxkv.client import Client

log = logging.getLogger(__name__)

# Per-turn options: given to a turn, or to the conversation as defaults for all its turns.
TURN_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "tool_choice", "model",
                "context_length", "speculative")


# --- a turn's result ------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool by the model. ``id`` is what its result names (``tool_call_id``);
    ``arguments_json`` is the daemon's JSON object text, ``arguments`` the same parsed."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments as a dict."""
        return json.loads(self.arguments_json) if self.arguments_json else {}


@dataclass
class Turn:
    """One committed assistant turn: its text, tool calls, token accounting, timings and
    revision. ``text`` excludes the tool calls' text (it is what the daemon stores)."""

    text: str
    token_ids: list[int]
    # "stop", "length", "stop_string" or "tool_calls".
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    completion_tokens: int
    cache_source: str
    cache_miss_reason: str
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float
    revision: int
    # The tools the model called, in order; answer them with Conversation.send_tool_results.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The turn sent tools, but the model's chat template does not render them: the model did
    # not see them.
    tools_ignored: bool = False
    # True when the full transcript had to be re-sent (the daemon had lost the conversation).
    resent: bool = False
    # Client side, from sending the request to the first token's arrival (its delta may hold no
    # text yet: a partial character, a held-back space); None if no token came.
    first_token_latency_s: float | None = None
    # Speculative decoding (speculative="prompt-lookup" or "draft"): draft tokens verified, and accepted.
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    start: pb.Start | None = field(default=None, repr=False)
    done: pb.Done | None = field(default=None, repr=False)


class _TurnEvents:
    """Accumulates one attempt's stream: Start, Deltas, Done."""

    def __init__(self) -> None:
        self.sent_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.start: pb.Start | None = None
        self.done: pb.Done | None = None
        self.texts: list[str] = []
        self.token_ids: list[int] = []

    def add(self, event: pb.GenerateResponse) -> str:
        """Record an event; returns the delta's text ('' for other events)."""
        kind = event.WhichOneof("event")
        if kind == "start":
            self.start = event.start
        elif kind == "delta":
            if self.first_token_at is None and event.delta.token_ids:
                self.first_token_at = time.perf_counter()
            self.texts.append(event.delta.text)
            self.token_ids.extend(event.delta.token_ids)
            return event.delta.text
        elif kind == "done":
            self.done = event.done
        return ""

    @property
    def streamed_text(self) -> bool:
        return any(self.texts)

    def to_turn(self, resent: bool) -> Turn:
        done = self.done
        assert done is not None
        start = self.start or pb.Start()
        usage = done.usage if done.HasField("usage") else None
        # The daemon's stored text is authoritative; deltas are its pieces.
        text = done.text if done.text or done.tool_calls or not self.texts else "".join(self.texts)
        return Turn(
            text=text,
            token_ids=list(self.token_ids),
            finish_reason=FINISH_REASON_NAMES.get(done.finish_reason, "unknown"),
            prompt_tokens=usage.prompt_tokens if usage else start.prompt_tokens,
            cached_tokens=usage.cached_tokens if usage else start.cached_tokens,
            prefill_tokens=usage.prefill_tokens if usage else start.prefill_tokens,
            completion_tokens=usage.completion_tokens if usage else len(self.token_ids),
            cache_source=CACHE_SOURCE_NAMES.get(start.cache_source, "none"),
            cache_miss_reason=start.cache_miss_reason,
            time_to_first_token_s=done.timings.time_to_first_token_s,
            prefill_tokens_per_s=done.timings.prefill_tokens_per_s,
            decode_tokens_per_s=done.timings.decode_tokens_per_s,
            total_s=done.timings.total_s,
            revision=done.revision,
            tool_calls=[ToolCall(c.id, c.name, c.arguments_json) for c in done.tool_calls],
            tools_ignored=start.tools_ignored,
            resent=resent,
            first_token_latency_s=(
                self.first_token_at - self.sent_at if self.first_token_at is not None else None
            ),
            drafted_tokens=usage.drafted_tokens if usage else 0,
            accepted_tokens=usage.accepted_tokens if usage else 0,
            start=self.start,
            done=done,
        )

    def assistant_message(self, text: str) -> dict[str, Any]:
        """The assistant message as the daemon stores it: ``text`` and Done's tool calls."""
        assert self.done is not None
        return message_from_proto(pb.Message(role="assistant", content=text, tool_calls=self.done.tool_calls))


# --- conversations --------------------------------------------------------------------------


class Conversation:
    """A conversation with the daemon: the committed transcript and its revision.

    ``messages`` holds only committed turns: a turn that fails or is cancelled changes
    nothing here or on the daemon. One Conversation object is for one caller: do not use it
    from several threads at once (a second turn while one is running raises RuntimeError).
    """

    def __init__(
        self,
        client: Client,
        conversation_id: str,
        *,
        messages: Sequence[Mapping[str, Any]] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        revision: int = 0,
        **defaults: Any,
    ) -> None:
        unknown = set(defaults) - set(TURN_OPTIONS)
        if unknown:
            raise TypeError(f"unknown conversation defaults: {sorted(unknown)}")
        for message in messages:
            message_to_proto(message)  # validate early, not at the first turn
        self._client = client
        self.conversation_id = conversation_id
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages]
        self.tools: list[dict[str, Any]] = [dict(t) for t in tools or ()]
        self.revision = revision
        self.defaults: dict[str, Any] = dict(defaults)
        self.last_turn: Turn | None = None
        # Until a turn commits, the daemon's copy is unknown: the first turn is a reset.
        self._needs_reset = revision == 0
        self._busy = False

    def __repr__(self) -> str:
        return (
            f"Conversation({self.conversation_id!r}, messages={len(self.messages)}, "
            f"revision={self.revision})"
        )

    # turns

    def send(
        self,
        content: str | None,
        *,
        role: str = "user",
        extra_messages: Sequence[Mapping[str, Any]] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        **options: Any,
    ) -> Turn:
        """Send a message (plus ``extra_messages`` before it, e.g. tool results) and wait for
        the answer. ``on_text`` gets each text delta; keyword options: ``max_tokens``,
        ``temperature`` (default 0: greedy), ``top_p``, ``top_k``, ``min_p``, ``seed``,
        ``stop``, ``tool_choice`` (``"auto"``, ``"none"``, ``"required"`` or a tool's name),
        ``model`` (a name from ``Client.list_models`` or a model directory; default: the
        daemon's resident model), ``context_length`` (a cap of the context window),
        ``speculative`` (``"prompt-lookup"``, ``"draft"`` or ``"off"``; default: the daemon's setting).
        ``content=None`` sends only ``extra_messages``.

        If the connection breaks mid-answer, the turn is retried from scratch and its text
        streams again from the start: ``on_restart`` is called first so that a caller who
        shows the deltas can clear them.
        """
        texts = self.stream(content, role=role, extra_messages=extra_messages, on_restart=on_restart, **options)
        return self._drain(texts, on_text)

    def warm(
        self,
        content: str,
        *,
        role: str = "user",
        extra_messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> pb.WarmResponse:
        """Prefill a draft of the next message (what the user has typed so far) so that
        sending it costs only what changed since: the daemon generates nothing and keeps no
        revision. Blocks until the draft is prefilled; call it from a background thread as
        the user types: a newer warm-up supersedes an older one still running
        (``superseded`` in its answer), and so does the next turn. Returns the token counts
        (``prompt_tokens``, ``cached_tokens``, ``prefilled_tokens``)."""
        new = [dict(m) for m in extra_messages or ()] + [{"role": role, "content": content}]
        for message in new:
            message_to_proto(message)
        reset = self._needs_reset or not self.conversation_id
        for _ in range(2):
            request = pb.WarmRequest(
                conversation_id=self.conversation_id,
                messages=[message_to_proto(m) for m in (self.messages + new if reset else new)],
                reset=reset,
                base_revision=0 if reset else self.revision,
                tools=[tool_to_proto(t) for t in self.tools] if reset else [],
                model=self.defaults.get("model") or "",
            )
            try:
                return self._client.warm(request)
            except MlxkvError as err:
                if err.code != grpc.StatusCode.FAILED_PRECONDITION or reset:
                    raise
                reset = True  # the daemon lost the conversation: warm the whole history
        raise AssertionError("unreachable")

    def send_tool_results(
        self,
        results: Sequence[Mapping[str, Any]],
        *,
        on_text: Callable[[str], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        **options: Any,
    ) -> Turn:
        """Answer the tool calls of the last turn and wait for the model's next answer.

        ``results`` holds one ``{"tool_call_id": ..., "content": ...}`` per answered call;
        ``content`` is a string, or any JSON value, sent as its JSON text. Each becomes a
        role "tool" message named after the tool called. Other arguments are ``send``'s. To
        stream the answer, pass ``tool_result_messages(results)`` to ``stream`` as
        ``extra_messages``.
        """
        messages = self.tool_result_messages(results)
        return self.send(None, extra_messages=messages, on_text=on_text, on_restart=on_restart, **options)

    def tool_result_messages(self, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The role "tool" messages of ``results`` (see ``send_tool_results``); ValueError
        when a result names no call of the last assistant message."""
        last = message_to_proto(self.messages[-1]) if self.messages else pb.Message()
        calls = {call.id: call.name for call in last.tool_calls}
        if not calls:
            raise ValueError("the last message of the conversation is not an assistant message with tool calls")
        messages = []
        for result in results:
            call_id = result.get("tool_call_id")
            if call_id not in calls:
                raise ValueError(f"no tool call {call_id!r} in the last answer (its calls: {sorted(calls)})")
            content = result.get("content", "")
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False)
            messages.append({"role": "tool", "content": content, "name": result.get("name") or calls[call_id],
                             "tool_call_id": call_id})
        if not messages:
            raise ValueError("no tool results to send")
        return messages

    def stream(
        self,
        content: str | None,
        *,
        role: str = "user",
        extra_messages: Sequence[Mapping[str, Any]] | None = None,
        on_restart: Callable[[], None] | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Like ``send`` but yields the text deltas; once exhausted, ``last_turn`` is the Turn
        (with its tool calls).

        Closing the iterator early cancels the turn (nothing is committed). A turn retried
        after a broken stream yields its text again from the start, after ``on_restart``.
        """
        new = [dict(m) for m in extra_messages or ()]
        if content is not None:
            new.append({"role": role, "content": content})
        if not new:
            raise ValueError("a turn needs at least one new message")
        return self._turn(list(self.messages), new, force_reset=False, on_restart=on_restart, **options)

    def regenerate(
        self,
        *,
        on_text: Callable[[str], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        **options: Any,
    ) -> Turn:
        """Drop the last assistant message and answer again (the history is re-sent with
        reset). The dropped answer comes back if the new turn fails."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no assistant message to regenerate")
        texts = self._turn(self.messages[:-1], [], force_reset=True, on_restart=on_restart, **options)
        return self._drain(texts, on_text)

    def reset(
        self,
        messages: Sequence[Mapping[str, Any]] = (),
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Replace the transcript (an edit); the next turn re-sends it all with reset.

        ``tools`` replaces the tool definitions when given.
        """
        for message in messages:
            message_to_proto(message)
        self.messages = [dict(m) for m in messages]
        if tools is not None:
            self.tools = [dict(t) for t in tools]
        self._needs_reset = True

    # persistence

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; ``Conversation.from_dict`` restores it."""
        return {
            "version": 1,
            "conversation_id": self.conversation_id,
            "revision": self.revision,
            "messages": [dict(m) for m in self.messages],
            "tools": [dict(t) for t in self.tools],
            "defaults": dict(self.defaults),
            "needs_reset": self._needs_reset,
        }

    @classmethod
    def from_dict(cls, client: Client, data: Mapping[str, Any]) -> Conversation:
        """Restore a conversation saved with ``to_dict``. Its next turn is a delta on the
        saved revision; a daemon that lost it answers FAILED_PRECONDITION and the transcript
        is re-sent."""
        if data.get("version", 1) != 1:
            raise ValueError(f"unsupported conversation format version {data.get('version')!r}")
        conv = cls(
            client,
            data["conversation_id"],
            messages=data.get("messages", ()),
            tools=data.get("tools") or None,
            revision=int(data.get("revision", 0)),
            **data.get("defaults", {}),
        )
        conv._needs_reset = bool(data.get("needs_reset", conv._needs_reset))
        return conv

    # the protocol

    def _drain(self, texts: Iterator[str], on_text: Callable[[str], None] | None) -> Turn:
        # Close explicitly: if on_text raises (Ctrl-C), the call is cancelled now, not when
        # the traceback lets go of the generator.
        with contextlib.closing(texts):
            for text in texts:
                if on_text is not None:
                    on_text(text)
        assert self.last_turn is not None
        return self.last_turn

    def _turn(
        self,
        history: list[dict[str, Any]],
        new: list[dict[str, Any]],
        *,
        force_reset: bool,
        on_restart: Callable[[], None] | None,
        **options: Any,
    ) -> Iterator[str]:
        # Validate now, not at the first next(): a bad argument is the caller's error and
        # should surface where the turn is asked for.
        params = self._options(options)
        for message in new:
            message_to_proto(message)
        return self._run(history, new, force_reset=force_reset, on_restart=on_restart, params=params)

    def _run(
        self,
        history: list[dict[str, Any]],
        new: list[dict[str, Any]],
        *,
        force_reset: bool,
        on_restart: Callable[[], None] | None,
        params: dict[str, Any],
    ) -> Iterator[str]:
        if self._busy:
            raise RuntimeError("a turn is already running on this conversation")
        self._busy = True
        try:
            reset = force_reset or self._needs_reset or not self.conversation_id
            resent = False
            window = self._client.restart_window()
            while True:
                events = _TurnEvents()
                request = self._request(history, new, reset=reset, params=params)
                try:
                    with contextlib.closing(self._client.generate(request)) as stream:
                        for event in stream:
                            text = events.add(event)
                            if text:
                                yield text
                except MlxkvError as err:
                    if events.done is not None:
                        # The daemon committed the turn at Done; a late error changes nothing.
                        log.debug("error after Done ignored: %s", err)
                    elif err.code == grpc.StatusCode.FAILED_PRECONDITION and not reset:
                        log.info("conversation %s: daemon lost it (%s); re-sending the transcript",
                                 self.conversation_id, err.details)
                        reset = resent = True
                        continue
                    elif err.code == grpc.StatusCode.UNAVAILABLE and window.wait():
                        log.info("conversation %s: daemon unavailable, retrying the turn", self.conversation_id)
                        if events.streamed_text:
                            # The daemon may not have the partial turn; start it over in full.
                            if on_restart is not None:
                                on_restart()
                            reset = resent = True
                        continue
                    else:
                        raise
                if events.done is None:
                    raise MlxkvError(grpc.StatusCode.INTERNAL, "the daemon ended the turn without a Done event")
                turn = events.to_turn(resent)
                self._commit(history + new + [events.assistant_message(turn.text)], turn)
                return
        finally:
            self._busy = False

    def _commit(self, messages: list[dict[str, Any]], turn: Turn) -> None:
        self.messages = messages
        self.revision = turn.revision
        self._needs_reset = not self.conversation_id
        self.last_turn = turn

    def _options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(TURN_OPTIONS)
        if unknown:
            raise TypeError(f"unknown turn options: {sorted(unknown)}")
        params = dict(self.defaults)
        params.update({k: v for k, v in overrides.items() if v is not None})
        return params

    def _request(
        self,
        history: list[dict[str, Any]],
        new: list[dict[str, Any]],
        *,
        reset: bool,
        params: Mapping[str, Any],
    ) -> pb.GenerateRequest:
        messages = history + new if reset else new
        stop = params.get("stop") or ()
        request = pb.GenerateRequest(
            conversation_id=self.conversation_id,
            messages=[message_to_proto(m) for m in messages],
            reset=reset,
            base_revision=0 if reset else self.revision,
            sampling=sampling_to_proto(params),
            stop=[stop] if isinstance(stop, str) else list(stop),
            # On a delta turn an empty list keeps the daemon's tools: send them only on reset.
            tools=[tool_to_proto(t) for t in self.tools] if reset else [],
            tool_choice=params.get("tool_choice") or "",
            model=params.get("model") or "",
            speculative=params.get("speculative") or "",
        )
        if params.get("max_tokens") is not None:
            request.max_tokens = params["max_tokens"]
        if params.get("context_length"):
            request.context_length = params["context_length"]
        return request
