"""The Python client of the mlxkv daemon: ``Client`` (one channel to the daemon's Unix socket)
and ``Conversation`` (a transcript kept client-side, synced with the daemon by revision).

The conversation protocol (see DESIGN.md): the first turn sends the whole history with
``reset=True``; later turns send only the new messages on top of ``base_revision``. When the
daemon has lost the conversation (restart, eviction, stale revision) it answers
FAILED_PRECONDITION and the turn is re-sent once with the full transcript, transparently: the
caller only sees ``Turn.resent``.

This module must import without MLX: it depends on grpcio, protobuf and platformdirs only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from mlxkv.paths import grpc_target, resolve_socket_path
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

START_HINT = (
    "start one with `mlxkvd serve` (or let `mlxkv --start` do it), or `mlxkvd install` to run "
    "it as a background service"
)

# A local socket is cheap to retry: keep gRPC's reconnect backoff short (its default grows
# to two minutes), so that a restarted daemon is found within a second.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id"})

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "unknown",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_STRING: "stop_string",
}

CACHE_SOURCES = {
    pb.CACHE_SOURCE_UNSPECIFIED: "none",
    pb.CACHE_SOURCE_NONE: "none",
    pb.CACHE_SOURCE_CONVERSATION: "conversation",
    pb.CACHE_SOURCE_SHARED_PREFIX: "shared_prefix",
    pb.CACHE_SOURCE_DISK: "disk",
    pb.CACHE_SOURCE_CHECKPOINT: "checkpoint",
}


# --- errors ---------------------------------------------------------------------------------


class MlxkvError(Exception):
    """An RPC to the daemon failed. ``code`` is the ``grpc.StatusCode``, ``details`` its text."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.details} ({self.code.name})"


class DaemonUnavailableError(MlxkvError):
    """No daemon answers on the socket; the message says how to start one."""

    def __init__(self, socket_path: str | Path, reason: str) -> None:
        self.socket_path = Path(socket_path)
        self.reason = reason
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"no mlxkv daemon is answering at {self.socket_path} ({reason}); {START_HINT}",
        )

    def __str__(self) -> str:
        return self.details


class NotFoundError(MlxkvError):
    """The daemon does not know the named conversation (NOT_FOUND)."""


def _map_rpc_error(err: grpc.RpcError, socket_path: Path) -> MlxkvError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return DaemonUnavailableError(socket_path, _probe_socket(socket_path) or details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(code, details)
    return MlxkvError(code, details)


def _probe_socket(path: Path) -> str | None:
    """Why nothing accepts connections on ``path``, or None if something does.

    A plain connect tells a missing socket from a dead daemon's stale one at once, where gRPC
    would only report UNAVAILABLE after its connect timeout.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
    except FileNotFoundError:
        return "no socket file"
    except ConnectionRefusedError:
        return "connection refused: a stale socket from a daemon that is gone"
    except PermissionError:
        return "permission denied: the socket belongs to another user"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
    return None


# --- conversions between the Python API's dicts and the protobufs ----------------------------


def message_to_proto(message: Mapping[str, Any]) -> pb.Message:
    """``{"role", "content"[, "name", "tool_call_id"]}`` -> ``Message``."""
    unknown = set(message) - _MESSAGE_KEYS
    if unknown:
        raise ValueError(f"unsupported message keys: {sorted(unknown)}")
    if not message.get("role"):
        raise ValueError("a message needs a role")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError("a message's content must be a string")
    return pb.Message(
        role=message["role"],
        content=content or "",
        name=message.get("name") or "",
        tool_call_id=message.get("tool_call_id") or "",
    )


def message_from_proto(message: pb.Message) -> dict[str, str]:
    """``Message`` -> dict, with the optional keys only when set."""
    out = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def tool_to_proto(tool: Mapping[str, Any]) -> pb.Tool:
    """``{"name", "description", "parameters": <JSON schema dict>}`` -> ``Tool``.

    OpenAI's ``{"type": "function", "function": {...}}`` wrapping is accepted too.
    """
    if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
        tool = tool["function"]
    if not tool.get("name"):
        raise ValueError("a tool needs a name")
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    return pb.Tool(
        name=tool["name"],
        description=tool.get("description") or "",
        parameters_json=json.dumps(parameters, sort_keys=True),
    )


def tool_from_proto(tool: pb.Tool) -> dict[str, Any]:
    """``Tool`` -> dict with ``parameters`` parsed back to a dict."""
    return {
        "name": tool.name,
        "description": tool.description,
        "parameters": json.loads(tool.parameters_json) if tool.parameters_json else {},
    }


def _sampling_to_proto(params: Mapping[str, Any]) -> pb.SamplingParams:
    sampling = pb.SamplingParams(
        temperature=params.get("temperature") or 0.0,
        top_k=params.get("top_k") or 0,
        min_p=params.get("min_p") or 0.0,
    )
    if params.get("top_p") is not None:
        sampling.top_p = params["top_p"]
    if params.get("seed") is not None:
        sampling.seed = params["seed"]
    return sampling


# --- a turn's result ------------------------------------------------------------------------


@dataclass
class Turn:
    """One committed assistant turn: its text, token accounting, timings and revision."""

    text: str
    token_ids: list[int]
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
    # True when the full transcript had to be re-sent (the daemon had lost the conversation).
    resent: bool = False
    # Client side, from sending the request to the first token's arrival (its delta may hold no
    # text yet: a partial character, a held-back space); None if no token came.
    first_token_latency_s: float | None = None
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
        return Turn(
            # The daemon's stored text is authoritative; deltas are its pieces.
            text=done.text if done.text or not self.texts else "".join(self.texts),
            token_ids=list(self.token_ids),
            finish_reason=FINISH_REASONS.get(done.finish_reason, "unknown"),
            prompt_tokens=usage.prompt_tokens if usage else start.prompt_tokens,
            cached_tokens=usage.cached_tokens if usage else start.cached_tokens,
            prefill_tokens=usage.prefill_tokens if usage else start.prefill_tokens,
            completion_tokens=usage.completion_tokens if usage else len(self.token_ids),
            cache_source=CACHE_SOURCES.get(start.cache_source, "none"),
            cache_miss_reason=start.cache_miss_reason,
            time_to_first_token_s=done.timings.time_to_first_token_s,
            prefill_tokens_per_s=done.timings.prefill_tokens_per_s,
            decode_tokens_per_s=done.timings.decode_tokens_per_s,
            total_s=done.timings.total_s,
            revision=done.revision,
            resent=resent,
            first_token_latency_s=(
                self.first_token_at - self.sent_at if self.first_token_at is not None else None
            ),
            start=self.start,
            done=done,
        )


# --- the client -----------------------------------------------------------------------------


class Client:
    """A connection to the mlxkv daemon over its Unix socket.

    ``socket_path`` defaults to ``$MLXKV_SOCKET`` or the per-user default (see
    ``mlxkv.paths``). ``timeout`` is the deadline of every RPC, a whole streamed turn included
    (None: no deadline). ``connect_timeout`` bounds the wait for a daemon whose socket accepts
    connections but whose gRPC server does not answer yet. ``retry_unavailable_s`` is how long
    a turn keeps retrying, from the moment it fails, while a daemon that this client has seen
    answer (in an earlier call, or in this turn before it broke) is restarting.

    A client that has never seen a daemon answer fails fast with ``DaemonUnavailableError``:
    the 30 s of patience are for restarts, not for a daemon that was never started. To wait for
    a daemon that is starting up, call ``wait_ready``.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float | None = None,
        connect_timeout: float = 5.0,
        retry_unavailable_s: float = 30.0,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry_unavailable_s = retry_unavailable_s
        self._channel = grpc.insecure_channel(grpc_target(self.socket_path), options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._seen_daemon = False

    # context manager / lifetime

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; open streams are cancelled."""
        self._channel.close()

    # unary RPCs

    def status(self) -> pb.Status:
        """The daemon's status: model, backend, memory, cache tiers and counters."""
        return self._unary(self._stub.GetStatus, pb.GetStatusRequest())

    def list_conversations(self) -> list[pb.Conversation]:
        """The conversations the daemon holds."""
        return list(self._unary(self._stub.ListConversations, pb.ListConversationsRequest()).conversations)

    def get_conversation(self, conversation_id: str) -> pb.Conversation:
        """One conversation as the daemon stores it; ``NotFoundError`` if unknown."""
        return self._unary(self._stub.GetConversation, pb.GetConversationRequest(conversation_id=conversation_id))

    def delete_conversation(self, conversation_id: str) -> pb.DeleteConversationResponse:
        """Forget a conversation and its caches; ``NotFoundError`` if unknown."""
        request = pb.DeleteConversationRequest(conversation_id=conversation_id)
        return self._unary(self._stub.DeleteConversation, request)

    def wait_ready(self, timeout: float = 30.0) -> pb.Status:
        """Wait until the daemon answers GetStatus; returns the status.

        Waits through a missing socket too (a daemon that is starting), unlike other calls.
        Raises ``DaemonUnavailableError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        reason = "not ready"
        while True:
            remaining = deadline - time.monotonic()
            if self._await_daemon(max(remaining, 0.0)):
                try:
                    status = self._stub.GetStatus(pb.GetStatusRequest(), timeout=max(remaining, 0.1))
                    self._seen_daemon = True
                    return status
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise _map_rpc_error(err, self.socket_path) from None
                    reason = err.details() or err.code().name
            else:
                reason = _probe_socket(self.socket_path) or "gRPC not ready"
            if time.monotonic() >= deadline:
                raise DaemonUnavailableError(self.socket_path, f"not ready after {timeout:g}s: {reason}")
            time.sleep(0.1)

    # generation

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """One raw Generate call: the daemon's events, no resend logic.

        gRPC errors are raised as ``MlxkvError`` (``DaemonUnavailableError`` for UNAVAILABLE).
        Closing the iterator cancels the call, which stops the daemon's generation.
        """
        call = self._stub.Generate(request, timeout=self.timeout)
        try:
            for event in call:
                self._seen_daemon = True
                yield event
        except grpc.RpcError as err:
            raise _map_rpc_error(err, self.socket_path) from None
        finally:
            call.cancel()

    def conversation(
        self,
        conversation_id: str | None = None,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **defaults: Any,
    ) -> Conversation:
        """A new conversation (a random id unless given); ``defaults`` are sampling defaults
        for its turns (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``seed``, ``stop``). ``""`` as id is a client-side-only conversation: every turn
        sends the whole transcript and the daemon keeps nothing."""
        if conversation_id is None:
            conversation_id = uuid.uuid4().hex
        messages = [{"role": "system", "content": system}] if system is not None else []
        return Conversation(self, conversation_id, messages=messages, tools=tools, **defaults)

    def ask(self, text: str, *, system: str | None = None, **sampling: Any) -> Turn:
        """A one-shot turn: nothing is kept by the daemon."""
        return self.conversation("", system=system).send(text, **sampling)

    # internals

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        for attempt in range(2):
            try:
                response = method(request, timeout=self.timeout)
                self._seen_daemon = True
                return response
            except grpc.RpcError as err:
                # One reconnect: the channel may be in its reconnect backoff after a restart.
                if err.code() == grpc.StatusCode.UNAVAILABLE and attempt == 0 and self._await_daemon(0.0):
                    continue
                raise _map_rpc_error(err, self.socket_path) from None
        raise AssertionError("unreachable")

    def _await_daemon(self, budget_s: float) -> bool:
        """Wait up to ``budget_s`` for the socket to accept connections, then up to
        ``connect_timeout`` for the channel to connect. False if no daemon came up."""
        deadline = time.monotonic() + budget_s
        pause = 0.05
        while (reason := _probe_socket(self.socket_path)) is not None:
            if time.monotonic() + pause > deadline:
                log.debug("no daemon at %s: %s", self.socket_path, reason)
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        wait = max(self.connect_timeout, deadline - time.monotonic())
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            log.debug("channel to %s not ready after %.1fs", self.socket_path, wait)
            return False
        return True


class _RestartWindow:
    """The retry budget of one turn for UNAVAILABLE (a daemon restarting).

    The window lasts ``retry_unavailable_s`` from the first failure after which the client has
    seen the daemon answer, in an earlier call or in this turn (its Start event): a client's
    first turn is retried like any later one once the daemon has answered it, and a long turn
    does not use the window up before anything fails.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._deadline: float | None = None
        self._pause = 0.1
        self._tries = 0

    def wait(self) -> bool:
        """Back off, then wait for the daemon; False when the budget is spent."""
        self._tries += 1
        if self._deadline is None and self._client._seen_daemon:
            self._deadline = time.monotonic() + self._client.retry_unavailable_s
        remaining = 0.0 if self._deadline is None else self._deadline - time.monotonic()
        if remaining <= 0:
            # A client that never reached a daemon still gets one reconnect attempt.
            return self._tries == 1 and self._client._await_daemon(0.0)
        time.sleep(min(self._pause, remaining))
        self._pause = min(self._pause * 2, 2.0)
        return self._client._await_daemon(max(self._deadline - time.monotonic(), 0.0))


# --- conversations --------------------------------------------------------------------------

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


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
        unknown = set(defaults) - set(_SAMPLING_KEYS)
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
        **sampling: Any,
    ) -> Turn:
        """Send a message (plus ``extra_messages`` before it, e.g. tool results) and wait for
        the answer. ``on_text`` gets each text delta; sampling keyword arguments:
        ``max_tokens``, ``temperature`` (default 0: greedy), ``top_p``, ``top_k``, ``min_p``,
        ``seed``, ``stop``. ``content=None`` sends only ``extra_messages``.

        If the connection breaks mid-answer, the turn is retried from scratch and its text
        streams again from the start: ``on_restart`` is called first so that a caller who
        shows the deltas can clear them.
        """
        texts = self.stream(content, role=role, extra_messages=extra_messages, on_restart=on_restart, **sampling)
        return self._drain(texts, on_text)

    def stream(
        self,
        content: str | None,
        *,
        role: str = "user",
        extra_messages: Sequence[Mapping[str, Any]] | None = None,
        on_restart: Callable[[], None] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Like ``send`` but yields the text deltas; once exhausted, ``last_turn`` is the Turn.

        Closing the iterator early cancels the turn (nothing is committed). A turn retried
        after a broken stream yields its text again from the start, after ``on_restart``.
        """
        new = [dict(m) for m in extra_messages or ()]
        if content is not None:
            new.append({"role": role, "content": content})
        if not new:
            raise ValueError("a turn needs at least one new message")
        return self._turn(list(self.messages), new, force_reset=False, on_restart=on_restart, **sampling)

    def regenerate(
        self,
        *,
        on_text: Callable[[str], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        **sampling: Any,
    ) -> Turn:
        """Drop the last assistant message and answer again (the history is re-sent with
        reset). The dropped answer comes back if the new turn fails."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no assistant message to regenerate")
        texts = self._turn(self.messages[:-1], [], force_reset=True, on_restart=on_restart, **sampling)
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
        **sampling: Any,
    ) -> Iterator[str]:
        # Validate now, not at the first next(): a bad argument is the caller's error and
        # should surface where the turn is asked for.
        params = self._sampling(sampling)
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
            window = _RestartWindow(self._client)
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
                self._commit(history, new, events.to_turn(resent))
                return
        finally:
            self._busy = False

    def _commit(self, history: list[dict[str, Any]], new: list[dict[str, Any]], turn: Turn) -> None:
        self.messages = history + new + [{"role": "assistant", "content": turn.text}]
        self.revision = turn.revision
        self._needs_reset = not self.conversation_id
        self.last_turn = turn

    def _sampling(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling arguments: {sorted(unknown)}")
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
            sampling=_sampling_to_proto(params),
            stop=[stop] if isinstance(stop, str) else list(stop),
            # On a delta turn an empty list keeps the daemon's tools: send them only on reset.
            tools=[tool_to_proto(t) for t in self.tools] if reset else [],
        )
        if params.get("max_tokens") is not None:
            request.max_tokens = params["max_tokens"]
        return request

