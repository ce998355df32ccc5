"""``Client``: one gRPC channel to the daemon's Unix socket, its RPCs, and the retry policy of
a daemon that restarts. Turns go through ``Client.conversation`` (``mlxkv.conversation``).

This module must import without MLX: it depends on grpcio, protobuf and platformdirs only.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental

from mlxkv.conversation import Conversation, Turn
from mlxkv.errors import DaemonUnavailableError, MlxkvError, NotFoundError
from mlxkv.paths import grpc_target, resolve_socket_path
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A local socket is cheap to retry: keep gRPC's reconnect backoff short (its default grows
# to two minutes), so that a restarted daemon is found within a second.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Generate's stream is read by the calling thread itself, not handed over from a polling
    # thread: one thread wake-up less per event (a few tenths of a millisecond per turn).
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


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

    def list_models(self) -> list[pb.ModelInfo]:
        """The local models a turn may name (``model=``): the catalogue of the daemon's
        models directory, the Hugging Face cache, LM Studio's models and the default model."""
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest()).models)

    def load_model(self, model: str = "", *, timeout: float | None = None) -> pb.LoadModelResponse:
        """Make ``model`` (a name from ``list_models`` or a model directory; "": the resident
        one) the daemon's resident model, loaded; waits for running turns of the previous one
        and for the load (``timeout`` seconds; None: however long it takes)."""
        request = pb.LoadModelRequest(model=model)
        try:
            return self._stub.LoadModel(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _map_rpc_error(err, self.socket_path) from None

    def unload_model(self) -> pb.UnloadModelResponse:
        """Free the resident model's memory (its caches go to disk); the next turn loads it."""
        return self._unary(self._stub.UnloadModel, pb.UnloadModelRequest())

    def warm(self, request: pb.WarmRequest) -> pb.WarmResponse:
        """Prefill a draft of a conversation's next turn (see ``Conversation.warm``)."""
        return self._unary(self._stub.Warm, request)

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

    def restart_window(self) -> RestartWindow:
        """A fresh retry budget for one turn (``Conversation`` takes one per turn)."""
        return RestartWindow(self)

    def conversation(
        self,
        conversation_id: str | None = None,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **defaults: Any,
    ) -> Conversation:
        """A new conversation (a random id unless given); ``tools`` are the functions the
        model may call (``{"name", "description", "parameters": <JSON schema>}``);
        ``defaults`` are option defaults for its turns (``max_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``tool_choice``). ``""`` as id
        is a client-side-only conversation: every turn sends the whole transcript and the
        daemon keeps nothing."""
        if conversation_id is None:
            conversation_id = uuid.uuid4().hex
        messages = [{"role": "system", "content": system}] if system is not None else []
        return Conversation(self, conversation_id, messages=messages, tools=tools, **defaults)

    def ask(
        self,
        text: str,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> Turn:
        """A one-shot turn: nothing is kept by the daemon."""
        return self.conversation("", system=system, tools=tools).send(text, **options)

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


class RestartWindow:
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
