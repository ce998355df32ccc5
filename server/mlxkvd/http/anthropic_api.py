"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) and its model
list.

A request becomes the daemon's messages (``turns.check_messages``): ``system`` first, less
Claude Code's billing header (``system_text``); a user message's ``tool_result`` blocks become
"tool" messages, in order, before the rest of its text; an assistant's ``tool_use`` blocks
become its ``tool_calls`` and its text blocks one content (the daemon cut its reply at the
calls: joined, they are the stored reply again); thinking blocks are dropped. Identity:
``metadata.user_id``, else Claude Code's session header, else the anonymous pool (see
``sessions.py``).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..events import Finished, Started, Text, Turn
from ..reply import ToolCall
from . import fields
from .errors import ANTHROPIC, error_body
from .fields import invalid
from ..catalog import ModelEntry
from .gateway import Gateway, created_at, sse, turn_headers

STOP_REASONS = {"stop": "end_turn", "stop_string": "stop_sequence", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
SESSION_HEADER = "x-claude-code-session-id"
DROPPED_BLOCKS = ("thinking", "redacted_thinking")
BILLING_HEADER = "x-anthropic-billing-header:"  # see system_text


def conversation(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The request's messages and tools in the daemon's shape."""
    out: list[dict[str, Any]] = []
    system = system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(fields.objects(body, "messages", required=True)):
        where = f"messages[{i}]"
        role = fields.get(m, "role", str, where=where, required=True)
        content = m.get("content")
        if role not in ("user", "assistant"):
            raise invalid(f"{where}.role must be user or assistant", param=f"{where}.role")
        if isinstance(content, str) or content is None:
            out.append({"role": role, "content": content or ""})
        elif not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
            raise invalid(f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
        elif role == "user":
            out += _user(content, f"{where}.content")
        else:
            out.append(_assistant(content, f"{where}.content"))
    tools = []
    for i, t in enumerate(fields.objects(body, "tools")):
        if t.get("type", "custom") != "custom":
            raise invalid(f"tools[{i}].type {t.get('type')!r} is not supported (only custom tools)", param=f"tools[{i}]")
        tools.append(fields.tool(t, f"tools[{i}]", "input_schema"))
    return out, tools


def system_text(system: Any) -> str:
    """The system prompt's text, without a leading billing header: Claude Code (2.1.36 on) puts
    an attribution line first whose value changes on every request. It is metadata for
    Anthropic's billing, not instructions; kept, it would make every request a new conversation
    that reuses the cache only up to that line."""
    text = fields.text(system, "system")  # all of it checked, so that an error names the block sent
    if not text.startswith(BILLING_HEADER):
        return text
    if isinstance(system, list):  # the first block, whole
        return fields.text(system[1:], "system")
    return text.partition("\n")[2]  # the first line


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    results, text = [], []
    for j, block in enumerate(blocks):
        if block.get("type") == "tool_result":
            content = fields.text(block.get("content"), f"{where}[{j}].content")
            if block.get("is_error"):
                content = "Error: " + content
            results.append({"role": "tool", "content": content,
                            "tool_call_id": fields.get(block, "tool_use_id", str, "", where=f"{where}[{j}]")})
        else:
            text.append(block)
    return results + ([{"role": "user", "content": fields.text(text, where)}] if text or not results else [])


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    text, calls = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "tool_use":
            calls.append(fields.tool_call(
                fields.get(block, "id", str, "", where=f"{where}[{j}]"),
                fields.get(block, "name", str, "", where=f"{where}[{j}]"),
                json.dumps(fields.get(block, "input", dict, {}, where=f"{where}[{j}]"), ensure_ascii=False),
                f"{where}[{j}]"))
        elif kind not in DROPPED_BLOCKS:
            text.append(block)
    message: dict[str, Any] = {"role": "assistant", "content": fields.text(text, where, "")}
    if calls:
        message["tool_calls"] = calls
    return message


def tool_choice(body: dict[str, Any], has_tools: bool) -> str:
    """"auto", "none", "required" (Anthropic's "any"), or the name of the tool to call."""
    choice = fields.get(body, "tool_choice", dict, {"type": "auto"})
    kind = choice.get("type")
    if kind == "tool":
        name = fields.get(choice, "name", str, where="tool_choice", required=True)
    elif kind in TOOL_CHOICES:
        name = TOOL_CHOICES[kind]
    else:
        raise invalid('tool_choice.type must be "auto", "any", "tool" or "none"', param="tool_choice")
    if name not in ("auto", "none") and not has_tools:
        raise invalid(f"tool_choice {kind!r} needs tools", param="tool_choice")
    return name


def _usage(event: Started | Finished, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": event.prompt_tokens - event.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": event.cached_tokens, "output_tokens": output_tokens}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


class AnthropicApi:
    """The endpoints, over the shared ``Gateway``."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    @staticmethod
    def model_json(entry: ModelEntry) -> dict[str, Any]:
        created = datetime.fromtimestamp(created_at(entry), timezone.utc)
        return {"type": "model", "id": entry.name, "display_name": entry.name,
                "created_at": created.isoformat().replace("+00:00", "Z")}

    def models(self) -> dict[str, Any]:
        data = [self.model_json(e) for e in self.gateway.models()]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    async def count_tokens(self, request: Request) -> Response:
        gw = self.gateway
        body = await gw.read_json(request)
        model = gw.check_model(fields.get(body, "model", str, required=True))
        messages, tools = conversation(body)
        return JSONResponse({"input_tokens": await gw.count_tokens(messages, tools, model)})

    async def messages(self, request: Request) -> Response:
        gw = self.gateway
        body = await gw.read_json(request)
        named = fields.get(body, "model", str, required=True)
        model = gw.check_model(named)
        max_tokens = fields.get(body, "max_tokens", int, required=True)
        messages, tools = conversation(body)
        stop = gw.stop_strings(fields.get(body, "stop_sequences", list, []))
        metadata = fields.get(body, "metadata", dict, {})
        session = fields.get(metadata, "user_id", str, where="metadata") or request.headers.get(SESSION_HEADER, "")
        turn = await gw.submit(
            "anthropic:" + session,
            messages,
            tools,
            sampling=gw.sampling(fields.get(body, "temperature", float, 1.0), fields.get(body, "top_p", float, 1.0),
                                 fields.get(body, "top_k", int, 0)),
            max_tokens=gw.max_tokens(max_tokens),
            stop=stop,
            tool_choice=tool_choice(body, bool(tools)),
            model=model,
        )
        head = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                "model": named}
        if fields.get(body, "stream", bool, False):
            # Waited for here so that a turn refused at once gets its status, not a broken stream.
            started = await gw.until_disconnected(request, turn, lambda: gw.next_event(turn))
            return gw.stream(turn, started, self._events(turn, head, started, stop))
        events = await gw.collect(request, turn)
        started, finished = events[0], events[-1]
        content = [{"type": "text", "text": finished.text}] if finished.text else []
        content += [_tool_use(c) for c in finished.tool_calls]
        return JSONResponse({
            **head, "content": content,
            "stop_reason": STOP_REASONS[finished.finish_reason],
            "stop_sequence": self._stop_sequence(finished, stop, events),
            "usage": _usage(finished, finished.completion_tokens),
        }, headers=turn_headers(started))

    def _stop_sequence(self, finished: Finished, stop: Sequence[str], events: Sequence[Any]) -> str | None:
        """The stop sequence that ended the reply: the one found earliest in its text."""
        if finished.finish_reason != "stop_string":
            return None
        if len(stop) == 1:
            return stop[0]
        text = self.gateway.runtime.decode([t for e in events if isinstance(e, Text) for t in e.token_ids])
        found = [(i, s) for s in stop if (i := text.find(s)) >= 0]
        return min(found)[1] if found else None

    async def _events(self, turn: Turn, head: dict[str, Any], started: Started,
                      stop: Sequence[str]) -> AsyncIterator[bytes]:
        """The turn as Anthropic's stream events. ``message_start`` goes out with the first token,
        as gRPC's first delta does; a text block opens at the first text, and closes before a
        tool call's block."""
        def event(kind: str, **data: Any) -> bytes:
            return sse({"type": kind, **data}, kind)

        blocks = 0  # blocks opened so far
        text_open = False
        events: list[Any] = []
        try:
            async for e in self.gateway.events(turn):
                events.append(e)
                if len(events) == 1:
                    yield event("message_start", message={**head, "content": [], "stop_reason": None,
                                                          "stop_sequence": None, "usage": _usage(started, 0)})
                if isinstance(e, Text):
                    if e.text:
                        if not text_open:
                            yield event("content_block_start", index=blocks, content_block={"type": "text", "text": ""})
                            text_open, blocks = True, blocks + 1
                        yield event("content_block_delta", index=blocks - 1, delta={"type": "text_delta", "text": e.text})
                    for call in e.tool_calls:
                        if text_open:
                            yield event("content_block_stop", index=blocks - 1)
                            text_open = False
                        yield event("content_block_start", index=blocks,
                                    content_block={"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                        yield event("content_block_delta", index=blocks,
                                    delta={"type": "input_json_delta", "partial_json": call.arguments})
                        yield event("content_block_stop", index=blocks)
                        blocks += 1
                elif isinstance(e, Finished):
                    if text_open:
                        yield event("content_block_stop", index=blocks - 1)
                    yield event("message_delta",
                                delta={"stop_reason": STOP_REASONS[e.finish_reason],
                                       "stop_sequence": self._stop_sequence(e, stop, events)},
                                usage=_usage(e, e.completion_tokens))
                    yield event("message_stop")
        except Exception as exc:  # noqa: BLE001 - the status is sent: the error goes in the stream
            yield sse(error_body(ANTHROPIC, exc)[1], "error")
