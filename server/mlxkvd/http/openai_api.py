"""OpenAI's Chat Completions API (``POST /v1/chat/completions``) and its model list.

A request's messages become the daemon's (``turns.check_messages``): "developer" is "system",
content parts are joined, an assistant's ``tool_calls`` carry their arguments as an object, a
tool result keeps its ``tool_call_id``. Nothing else is kept, and the same request always
makes the same messages, so that a resent history matches the stored conversation. Identity:
``prompt_cache_key``, else ``user``, else the anonymous pool (see ``sessions.py``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..events import Finished, Text, Turn
from ..reply import ToolCall
from . import fields
from .errors import OPENAI, error_body
from .fields import invalid
from ..catalog import ModelEntry
from .gateway import Gateway, created_at, sse, turn_headers

FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "tool_calls": "tool_calls"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
OWNER = "mlxkv"


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's messages in the daemon's shape."""
    out = []
    for i, m in enumerate(fields.objects(body, "messages", required=True)):
        where = f"messages[{i}]"
        role = ROLES.get(fields.get(m, "role", str, where=where, required=True))
        if role is None:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        # An assistant's text comes back as the daemon stored it: its parts are joined as they were cut.
        message: dict[str, Any] = {"role": role,
                                   "content": fields.text(m.get("content"), f"{where}.content",
                                                          "" if role == "assistant" else "\n")}
        if role == "assistant":
            calls = [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(fields.objects(m, "tool_calls", where=where))]
            if calls:
                message["tool_calls"] = calls
        elif role == "tool":
            message["tool_call_id"] = fields.get(m, "tool_call_id", str, "", where=where)
        out.append(message)
    return out


def _call(call: dict[str, Any], where: str) -> dict[str, Any]:
    function = fields.get(call, "function", dict, where=where, required=True)
    return fields.tool_call(fields.get(call, "id", str, "", where=where),
                            fields.get(function, "name", str, "", where=f"{where}.function"),
                            fields.get(function, "arguments", str, "", where=f"{where}.function"), where)


def tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(fields.objects(body, "tools")):
        where = f"tools[{i}]"
        if t.get("type", "function") != "function":
            raise invalid(f"{where}.type {t.get('type')!r} is not supported (only function tools)", param=where)
        out.append(fields.tool(fields.get(t, "function", dict, where=where, required=True), f"{where}.function", "parameters"))
    return out


def tool_choice(body: dict[str, Any], has_tools: bool) -> str:
    """"auto", "none", "required", or the name of the tool that must be called."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = fields.get(choice["function"], "name", str, where="tool_choice.function", required=True)
    elif choice in ("auto", "none", "required"):
        name = choice
    else:
        raise invalid('tool_choice must be "auto", "none", "required" or {"type": "function", '
                      '"function": {"name": ...}}', param="tool_choice")
    if name not in ("auto", "none") and not has_tools:
        raise invalid(f"tool_choice {name!r} needs tools", param="tool_choice")
    return name


def _stop(body: dict[str, Any]) -> list[Any]:
    stop = body.get("stop")
    return [] if stop is None else [stop] if isinstance(stop, str) else fields.get(body, "stop", list)


def _usage(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def _calls_json(calls: tuple[ToolCall, ...], first_index: int | None = None) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape (arguments as JSON text); with ``index`` in a stream."""
    return [
        {**({"index": first_index + k} if first_index is not None else {}),
         "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for k, c in enumerate(calls)
    ]


class OpenAIApi:
    """The endpoints, over the shared ``Gateway``."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]

    @staticmethod
    def model_json(entry: ModelEntry) -> dict[str, Any]:
        return {"id": entry.name, "object": "model", "created": created_at(entry), "owned_by": OWNER}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_json(e) for e in self.gateway.models()]}

    async def chat_completions(self, request: Request) -> Response:
        gw = self.gateway
        body = await gw.read_json(request)
        named = fields.get(body, "model", str, required=True)
        model = gw.check_model(named)
        if fields.get(body, "n", int, 1) != 1:
            raise invalid("n must be 1: one choice per request", param="n")
        tool_list = tools(body)
        requested = fields.get(body, "max_completion_tokens", int)
        if requested is None:
            requested = fields.get(body, "max_tokens", int)
        stream = fields.get(body, "stream", bool, False)
        include_usage = fields.get(fields.get(body, "stream_options", dict, {}), "include_usage", bool, False,
                                   where="stream_options")
        session = fields.get(body, "prompt_cache_key", str) or fields.get(body, "user", str) or ""
        turn = await gw.submit(
            "openai:" + session,
            messages(body),
            tool_list,
            sampling=gw.sampling(fields.get(body, "temperature", float, 1.0), fields.get(body, "top_p", float, 1.0),
                                 seed=fields.get(body, "seed", int)),
            max_tokens=gw.max_tokens(requested),
            stop=gw.stop_strings(_stop(body)),
            tool_choice=tool_choice(body, bool(tool_list)),
            model=model,
        )
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": named,
                "system_fingerprint": "fp_" + turn.plan.fingerprint}
        if stream:
            # Waited for here so that a turn refused at once gets its status, not a broken stream.
            started = await gw.until_disconnected(request, turn, lambda: gw.next_event(turn))
            return gw.stream(turn, started, self._chunks(turn, head, include_usage))
        events = await gw.collect(request, turn)
        started, finished = events[0], events[-1]
        message: dict[str, Any] = {"role": "assistant",
                                   "content": finished.text if finished.text or not finished.tool_calls else None,
                                   "refusal": None}
        if finished.tool_calls:
            message["tool_calls"] = _calls_json(finished.tool_calls)
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS[finished.finish_reason]}],
            "usage": _usage(finished),
        }, headers=turn_headers(started))

    async def _chunks(self, turn: Turn, head: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
        """The turn as ``chat.completion.chunk`` events. The first goes out with the first token
        (the role, and the token's text if it has any), as gRPC's first delta does."""
        head = {**head, "object": "chat.completion.chunk"}
        if include_usage:
            head["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        started = False
        calls = 0
        try:
            async for event in self.gateway.events(turn):
                if isinstance(event, Text):
                    if not started or event.text:
                        yield chunk({"role": "assistant", "content": event.text} if not started else {"content": event.text})
                        started = True
                    if event.tool_calls:
                        yield chunk({"tool_calls": _calls_json(event.tool_calls, calls)})
                        calls += len(event.tool_calls)
                elif isinstance(event, Finished):
                    if not started:
                        yield chunk({"role": "assistant", "content": ""})
                    yield chunk({}, FINISH_REASONS[event.finish_reason])
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": _usage(event)})
        except Exception as exc:  # noqa: BLE001 - the status is sent: the error goes in the stream
            yield sse(error_body(OPENAI, exc)[1])
            return
        yield b"data: [DONE]\n\n"

