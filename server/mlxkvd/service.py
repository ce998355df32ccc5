"""The gRPC servicer: validates requests, submits turns, streams events, maps errors."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any, Iterator

import grpc

from mlxkv.convert import CACHE_SOURCE_VALUES, FINISH_REASON_VALUES, message_from_proto, message_to_proto
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

from . import params
from .conversations import ConversationRecord
from .catalog import ModelEntry
from .engine import Engine
from .models import ModelHost
from .events import Failed, Finished, Started, Text, Turn
from .reply import ToolCall
from .errors import ConversationNotFoundError, InvalidRequestError, MlxkvError, status_code
from .runtime import Sampling
from .turns import Turns

log = logging.getLogger(__name__)

MAX_CONVERSATION_ID_BYTES = 256

def validate_conversation_id(conversation_id: str, *, allow_empty: bool) -> None:
    if not conversation_id:
        if allow_empty:
            return
        raise InvalidRequestError("conversation_id must not be empty")
    if len(conversation_id.encode()) > MAX_CONVERSATION_ID_BYTES:
        raise InvalidRequestError(
            f"conversation_id is longer than {MAX_CONVERSATION_ID_BYTES} bytes"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in conversation_id):
        raise InvalidRequestError("conversation_id must not contain control characters or NUL")


def _messages(request: pb.GenerateRequest | pb.WarmRequest) -> list[dict[str, Any]]:
    """The request's messages as dicts in the shape chat templates take: tool-call arguments
    as objects (``turns.check_messages`` checks the rest)."""
    out = [message_from_proto(m) for m in request.messages]
    for i, message in enumerate(out):
        for j, call in enumerate(message.get("tool_calls", ())):
            function = call["function"]
            try:
                function["arguments"] = json.loads(function["arguments"] or "{}")
            except (ValueError, RecursionError) as exc:
                raise InvalidRequestError(
                    f"messages[{i}].tool_calls[{j}].arguments_json is not JSON: {exc}") from None
    return out


def _tool_call_pb(call: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments)


def _tools(request: pb.GenerateRequest | pb.WarmRequest) -> list[dict[str, Any]]:
    tools = []
    for i, t in enumerate(request.tools):
        if not t.name:
            raise InvalidRequestError(f"tools[{i}].name must not be empty")
        parameters: Any = {"type": "object", "properties": {}}
        if t.parameters_json:
            try:
                parameters = json.loads(t.parameters_json)
            except ValueError as exc:
                raise InvalidRequestError(f"tools[{i}].parameters_json is not JSON: {exc}") from exc
            except RecursionError:
                raise InvalidRequestError(f"tools[{i}].parameters_json nests too deeply") from None
            if not isinstance(parameters, dict):
                raise InvalidRequestError(f"tools[{i}].parameters_json must be a JSON object")
        tools.append({"name": t.name, "description": t.description, "parameters": parameters})
    return tools


def _sampling(request: pb.GenerateRequest) -> Sampling:
    s = request.sampling
    return params.sampling(
        s.temperature,
        s.top_p if s.HasField("top_p") else 1.0,
        s.top_k,
        s.min_p,
        s.seed if s.HasField("seed") else None,
    )


def _conversation_pb(record: ConversationRecord, cache: tuple[str, tuple[int, ...], int] | None) -> pb.Conversation:
    """``cache``: the store's ``entry_info`` of the conversation (tier, tokens, bytes), if any."""
    tier, tokens, nbytes = cache if cache is not None else ("none", (), 0)
    return pb.Conversation(
        conversation_id=record.conversation_id,
        revision=record.revision,
        messages=[message_to_proto(m) for m in record.messages],
        tools=[
            pb.Tool(
                name=t["name"],
                description=t.get("description", ""),
                parameters_json=json.dumps(t.get("parameters", {})),
            )
            for t in record.tools
        ],
        cache_tier=tier,
        tokens=len(tokens),
        cache_bytes=nbytes,
        created_at=record.created_at,
        updated_at=record.updated_at,
        model=record.model,
    )


def _model_pb(entry: ModelEntry, loaded: bool) -> pb.ModelInfo:
    return pb.ModelInfo(name=entry.name, path=str(entry.path), source=entry.source, size_bytes=entry.size_bytes,
                        quantization=entry.quantization, context_length=entry.context_length,
                        model_type=entry.model_type, loaded=loaded, ready=entry.ready)


def _event_pb(event: Started | Text | Finished, conversation_id: str) -> pb.GenerateResponse:
    if isinstance(event, Text):
        return pb.GenerateResponse(delta=pb.Delta(
            text=event.text, token_ids=event.token_ids, tool_calls=[_tool_call_pb(c) for c in event.tool_calls]
        ))
    if isinstance(event, Started):
        return pb.GenerateResponse(
            start=pb.Start(
                conversation_id=conversation_id,
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                cache_source=CACHE_SOURCE_VALUES.get(event.cache_source, pb.CACHE_SOURCE_UNSPECIFIED),
                prefill_tokens=event.prompt_tokens - event.cached_tokens,
                cache_miss_reason=event.cache_miss_reason,
                tools_ignored=event.tools_ignored,
            )
        )
    return pb.GenerateResponse(
        done=pb.Done(
            finish_reason=FINISH_REASON_VALUES[event.finish_reason],
            usage=pb.Usage(
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                prefill_tokens=event.prompt_tokens - event.cached_tokens,
                completion_tokens=event.completion_tokens,
                drafted_tokens=event.drafted_tokens,
                accepted_tokens=event.accepted_tokens,
            ),
            timings=pb.Timings(
                time_to_first_token_s=event.time_to_first_token_s,
                prefill_tokens_per_s=event.prefill_tokens_per_s,
                decode_tokens_per_s=event.decode_tokens_per_s,
                total_s=event.total_s,
                queue_s=event.queue_s,
            ),
            revision=event.revision,
            text=event.text,
            tool_calls=[_tool_call_pb(c) for c in event.tool_calls],
        )
    )


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class InferenceService(pb_grpc.InferenceServicer):
    """A thin adapter: protobuf in, engine turns and registry queries, protobuf out."""

    def __init__(self, engine: Engine, models: ModelHost, *, default_max_tokens: int, socket_path: str = ""):
        self.engine = engine
        self.models = models
        self.registry = engine.registry
        self.turns = Turns(engine, engine.registry, models)
        self.default_max_tokens = default_max_tokens
        self.socket_path = socket_path
        self.started_at = time.monotonic()

    def _submit(self, request: pb.GenerateRequest) -> Turn:
        validate_conversation_id(request.conversation_id, allow_empty=True)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.default_max_tokens
        return self.turns.submit(
            request.conversation_id,
            _messages(request),
            _tools(request),
            reset=request.reset,
            base_revision=request.base_revision,
            sampling=_sampling(request),
            max_tokens=max_tokens,
            stop=params.stop_strings(request.stop),
            tool_choice=request.tool_choice,
            model=request.model,
            context_length=request.context_length if request.HasField("context_length") else 0,
            speculative=request.speculative,
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        try:
            turn = self._submit(request)
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        # Runs when the RPC ends for any reason; after a committed turn it is a no-op.
        if not context.add_callback(lambda: self.turns.cancel(turn)):
            self.turns.cancel(turn)  # the client is already gone
        while True:
            event = turn.events.get()
            if isinstance(event, Failed):
                code = status_code(event.error)
                message = str(event.error) if code != grpc.StatusCode.INTERNAL else (
                    f"internal error: {type(event.error).__name__}: {event.error}"
                )
                context.abort(code, message)
            yield _event_pb(event, request.conversation_id)
            if isinstance(event, Finished):
                return

    def Warm(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> pb.WarmResponse:
        started = time.perf_counter()
        try:
            validate_conversation_id(request.conversation_id, allow_empty=False)
            turn = self.turns.warm(request.conversation_id, _messages(request), _tools(request),
                                   reset=request.reset, base_revision=request.base_revision,
                                   model=request.model)
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        if not context.add_callback(turn.cancel):
            turn.cancel()
        try:
            warmed = self.turns.wait_warm(turn)
        except Exception as exc:  # noqa: BLE001 - every failure is a status
            code = status_code(exc)
            context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else
                          f"internal error: {type(exc).__name__}: {exc}")
        return pb.WarmResponse(prompt_tokens=warmed.prompt_tokens, cached_tokens=warmed.cached_tokens,
                               prefilled_tokens=warmed.prefilled_tokens, superseded=warmed.superseded,
                               total_s=time.perf_counter() - started)

    def GetConversation(self, request, context):
        try:
            validate_conversation_id(request.conversation_id, allow_empty=False)
            record = self.registry.get(request.conversation_id)
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        return _conversation_pb(record, self.engine.cache_info(record.conversation_id))

    def ListConversations(self, request, context):
        return pb.ListConversationsResponse(
            conversations=[
                _conversation_pb(r, self.engine.cache_info(r.conversation_id))
                for r in self.registry.list()
            ]
        )

    def DeleteConversation(self, request, context):
        try:
            validate_conversation_id(request.conversation_id, allow_empty=False)
            try:
                self.registry.delete(request.conversation_id)
                known = True
            except ConversationNotFoundError:
                known = False
            # The caches may outlive the record (after a restart): delete them either way.
            cached = self.engine.delete_cache(request.conversation_id)
            if not known and not cached:
                raise ConversationNotFoundError(f"no conversation {request.conversation_id!r}")
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        return pb.DeleteConversationResponse()

    def ListModels(self, request, context):
        resident = self.models.entry
        models = self.models.catalog.entries()
        if not any(e.path == resident.path for e in models):
            models.insert(0, resident)  # a directory a request named
        loaded = self.engine.runtime.loaded
        return pb.ListModelsResponse(models=[_model_pb(e, loaded and e.path == resident.path) for e in models])

    def LoadModel(self, request, context):
        try:
            switched = self.models.switch(request.model)
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        return pb.LoadModelResponse(model=_model_pb(switched.entry, True), switch_s=switched.switch_s,
                                    load_s=switched.load_s, loaded_now=switched.loaded_now)

    def UnloadModel(self, request, context):
        try:
            name, moved = self.engine.unload_model()
        except MlxkvError as exc:
            context.abort(status_code(exc), str(exc))
        return pb.UnloadModelResponse(model=name, caches_moved=moved)

    def GetStatus(self, request, context):
        rt = self.engine.runtime
        state = self.models.state
        c = self.engine.counters
        stats = self.engine.store_stats()
        tiers = [
            pb.CacheTier(
                name=name,
                entries=int(s.get("entries", 0)),
                bytes=int(s.get("bytes", 0)),
                budget_bytes=int(s.get("budget_bytes", 0)),
                hits=int(s.get("hits", 0)),
                misses=int(s.get("misses", 0)),
                in_flight_bytes=int(s.get("in_flight_bytes", 0)),
            )
            for name, s in stats.items()
            if isinstance(s, dict)
        ]
        from . import __version__

        return pb.Status(
            version=__version__,
            model=rt.name,
            model_fingerprint=rt.fingerprint,
            backend=rt.backend,
            model_loaded=rt.loaded,
            uptime_s=time.monotonic() - self.started_at,
            requests=c.requests,
            requests_failed=c.requests_failed,
            active_requests=self.engine.active_requests,
            tokens_saved=c.tokens_saved,
            tokens_prefilled=c.tokens_prefilled,
            tokens_generated=c.tokens_generated,
            tokens_drafted=c.tokens_drafted,
            tokens_accepted=c.tokens_accepted,
            cache_tiers=tiers,
            conversations=len(self.registry),
            rss_bytes=rss_bytes(),
            socket=self.socket_path,
            context_length=self.models.context_length(rt),
            weights_dtype=rt.weights_dtype,
            model_state=state.state,
            load_progress=state.progress,
            model_path=str(rt.model_dir),
            draft_model=self.turns.draft_model or "",
        )
