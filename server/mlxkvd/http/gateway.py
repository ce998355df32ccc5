"""What the OpenAI and Anthropic adapters share: the request body within its cap, the model's
identity, ``max_tokens``, and turns of the daemon's ``Turns`` as awaitable events.

A turn is submitted on a worker thread (rendering and tokenizing a long history takes
milliseconds: never on the event loop). Its events arrive on a blocking queue; each is taken
at once when it is already there, else by a worker thread, so that the event loop never waits.
Every turn is cancelled when its response ends, whatever the reason (a no-op once it has
finished): a client that disconnects stops the turn within one decode step. A response says in
a header what the turn's Started event says of it (``turn_headers``): both APIs have a body
with no place for it, and a stream's headers go out before any event.
"""

from __future__ import annotations

import json
import queue
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .. import params
from ..events import Failed, Finished, Started, Turn
from ..catalog import ModelEntry
from ..errors import InvalidRequestError, ModelNotFoundError
from ..runtime import ModelRuntime, Sampling
from ..turns import Turns
from .errors import INVALID, MODEL_NOT_FOUND, TOO_LARGE, HttpError
from .fields import invalid

# Threads that wait for turn events: one per turn in flight, apart from the default pool (which
# submits), so that many slow streams never hold up a new request.
MAX_WAITING_THREADS = 256
# Sent as "true" when the request's tools reached the model nowhere: the chat template renders
# none (the socket's ``Start.tools_ignored``); absent otherwise.
TOOLS_IGNORED_HEADER = "X-Mlxkv-Tools-Ignored"


def turn_headers(started: Started) -> dict[str, str]:
    """The response headers that say what the turn's Started event says."""
    return {TOOLS_IGNORED_HEADER: "true"} if started.tools_ignored else {}


def created_at(entry: ModelEntry) -> int:
    """When a model was made, as the APIs' model objects say it: its files' time, in seconds."""
    try:
        return int(entry.path.stat().st_mtime)
    except OSError:  # the default model before its first conversion
        return 0


class Gateway:
    """The daemon's ``Turns`` as the HTTP adapters use it."""

    def __init__(self, turns: Turns, *, default_max_tokens: Callable[[], int], max_body_bytes: int):
        self.turns = turns
        self.default_max_tokens = default_max_tokens  # SIGHUP may change it
        self.max_body_bytes = max_body_bytes
        self._waiters: anyio.CapacityLimiter | None = None

    # -- requests -------------------------------------------------------------------------

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object; 413 past ``max_body_bytes`` (read no further), 400 if it
        is not a JSON object."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HttpError(TOO_LARGE, f"the request body has {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HttpError(TOO_LARGE, f"the request body is over the limit of {limit} bytes")
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise invalid(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise invalid("the request body must be a JSON object")
        return value

    @property
    def runtime(self) -> ModelRuntime:
        """The resident model's runtime (it changes when a request names another model)."""
        return self.turns.engine.runtime

    @property
    def model_name(self) -> str:
        return self.runtime.name

    def models(self) -> list[ModelEntry]:
        """The catalogue, the resident model first."""
        host = self.turns.models
        entries = host.catalog.entries()
        resident = [e for e in entries if e.path == host.entry.path] or [host.entry]
        return resident + [e for e in entries if e.path != host.entry.path]

    def check_model(self, model: str) -> str:
        """``model``, if it names a model of the catalogue, a model directory or the resident
        model (its name or its directory's); 404 if it names none, 400 for a directory that is
        not a model."""
        runtime = self.runtime
        if model == runtime.model_dir.name:
            return str(runtime.model_dir)
        try:
            self.turns.models.resolve(model)
        except ModelNotFoundError as exc:
            raise HttpError(MODEL_NOT_FOUND, str(exc), param="model") from None
        except InvalidRequestError as exc:
            raise HttpError(INVALID, str(exc), param="model") from None
        return model

    def max_tokens(self, requested: int | None) -> int:
        """``requested``, else the daemon's default (cut to the model's context window when
        the turn is submitted)."""
        return self.default_max_tokens() if requested is None else requested

    @staticmethod
    def sampling(temperature: float, top_p: float, top_k: int = 0, seed: int | None = None) -> Sampling:
        return params.sampling(temperature, top_p, top_k, 0.0, seed)

    @staticmethod
    def stop_strings(stop: Sequence[Any]) -> tuple[str, ...]:
        if not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("stop sequences must be strings")
        return params.stop_strings(stop)

    # -- turns ----------------------------------------------------------------------------

    async def submit(self, session: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     **turn: Any) -> Turn:
        """``Turns.submit_stateless`` on a worker thread (it waits there for a model switch)."""
        return await anyio.to_thread.run_sync(partial(self.turns.submit_stateless, session, messages, tools,
                                                      clamp_max_tokens=True, **turn))

    async def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str = "") -> int:
        return await anyio.to_thread.run_sync(self.turns.count_tokens, messages, tools, model)

    async def next_event(self, turn: Turn) -> Any:
        """The turn's next event: Started, Text or Finished; raises the error of a Failed."""
        try:
            event = turn.events.get_nowait()
        except queue.Empty:
            if self._waiters is None:
                self._waiters = anyio.CapacityLimiter(MAX_WAITING_THREADS)
            # Abandoned if the response is cancelled: the cancelled turn's Failed event wakes it.
            event = await anyio.to_thread.run_sync(turn.events.get, abandon_on_cancel=True,
                                                   limiter=self._waiters)
        if isinstance(event, Failed):
            raise event.error
        return event

    async def events(self, turn: Turn) -> AsyncIterator[Any]:
        """The turn's events up to and including Finished."""
        while True:
            event = await self.next_event(turn)
            yield event
            if isinstance(event, Finished):
                return

    async def until_disconnected(self, request: Request, turn: Turn, work: Callable[[], Awaitable[Any]]) -> Any:
        """``await work()``, unless the client disconnects first: then the turn is cancelled and
        ``ClientGone`` raised. For the waits before a response starts (a streamed response
        notices a disconnect itself)."""
        outcome: list[tuple[bool, Any]] = []
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    outcome.append((True, await work()))
                except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                    outcome.append((False, exc))
                group.cancel_scope.cancel()
        except BaseException:
            self.turns.cancel(turn)
            raise
        if not outcome:
            self.turns.cancel(turn)
            raise ClientGone()
        ok, value = outcome[0]
        if not ok:
            self.turns.cancel(turn)
            raise value
        return value

    async def collect(self, request: Request, turn: Turn) -> list[Any]:
        """Every event of the turn, for a response that is not streamed."""
        async def run() -> list[Any]:
            return [event async for event in self.events(turn)]

        return await self.until_disconnected(request, turn, run)

    def stream(self, turn: Turn, started: Started, chunks: AsyncIterator[bytes]) -> "TurnStream":
        """A server-sent events response of ``chunks``, with the headers of the turn's Started
        event (taken before: the headers go first); the turn is cancelled when it ends."""
        return TurnStream(self.turns, turn, chunks, turn_headers(started))


class ClientGone(Exception):
    """The client disconnected before its response started."""


class TurnStream(StreamingResponse):
    """A server-sent events stream of one turn, cancelled however the response ends (a client
    that disconnects cancels the response; a client gone before it started never iterates it)."""

    def __init__(self, turns: Turns, turn: Turn, chunks: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self._turns = turns
        self._turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._turns.cancel(self._turn)


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")) if not isinstance(data, str) else data
    return (f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n").encode()
