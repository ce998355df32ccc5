"""OpenAI's Responses API (``POST /v1/responses``; ``GET`` and ``DELETE /v1/responses/{id}``),
the wire API of Codex and of the SDK's ``client.responses``.

A request's ``input`` items become the daemon's messages: a ``message`` item by its role
("developer" is "system"), ``function_call`` items the ``tool_calls`` of the assistant message
before them (or of a new one), ``function_call_output`` items "tool" messages, ``reasoning``
items nothing (this daemon makes none; nor does it run hosted tools, whose call items are
skipped too). Function tools reach the model, those grouped in ``namespace`` tools too (see
``Tools``); tools of other types are dropped and named in the ``X-Mlxkv-Tools-Dropped`` response
header (Codex sends web search on by default). ``instructions`` is the system message, and is not
carried over to a later response, as OpenAI's is not. The reply is a ``message`` item (its
text) followed by one ``function_call`` item per call; sent back as input they make the stored
assistant message again, so a resent history continues its conversation's cache.

``previous_response_id`` continues a response kept by this daemon (``store``, true unless the
request says false): the last ``KEPT_RESPONSES`` are kept in memory, with the history that led
to each. Identity, as for Chat Completions: ``prompt_cache_key``, else ``user``, else the
anonymous pool (see ``sessions.py``).
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import lru
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..events import Finished, Text, Turn
from ..reply import ToolCall
from . import fields
from .errors import NOT_FOUND, HttpError, classify
from .fields import invalid
from .gateway import Gateway, sse, turn_headers

KEPT_RESPONSES = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
SKIPPED_ITEMS = ("reasoning",)
# Calls of hosted tools (never made here) that a client may send back: nothing for the model.
HOSTED_CALL_ITEMS = ("web_search_call", "file_search_call", "code_interpreter_call", "image_generation_call")
# Response header naming the request's tools that cannot run here (see ``Tools``).
TOOLS_DROPPED_HEADER = "X-Mlxkv-Tools-Dropped"


def _content(content: Any, where: str) -> str:
    """A message item's text: a string, or text parts (input_text, output_text) joined as they
    were cut; a refusal part's text counts as text, media parts are a 400."""
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in fields.MEDIA_TYPES:
            raise invalid(f"{where}[{i}]: {kind} content is not supported: the model reads text only",
                          param=f"{where}[{i}]")
        key = "refusal" if kind == "refusal" else "text"
        if kind not in (*TEXT_PARTS, "refusal") or not isinstance(part.get(key), str):
            raise invalid(f"{where}[{i}] must be a text part ({{\"type\": \"input_text\", \"text\": ...}})",
                          param=f"{where}[{i}]")
        texts.append(part[key])
    return "".join(texts)


def input_messages(body: dict[str, Any], tools: "Tools") -> list[dict[str, Any]]:
    """The request's ``input`` in the daemon's message shape."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(fields.objects(body, "input", required=True)):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = ROLES.get(fields.get(item, "role", str, where=where, required=True))
            if role is None:
                raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name = tools.visible_name(fields.get(item, "name", str, "", where=where),
                                      fields.get(item, "namespace", str, where=where))
            call = fields.tool_call(fields.get(item, "call_id", str, "", where=where), name,
                                    fields.get(item, "arguments", str, "", where=where), where)
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": fields.get(item, "call_id", str, "", where=where),
                        "content": _content(item.get("output"), f"{where}.output")})
        elif kind in SKIPPED_ITEMS or kind in HOSTED_CALL_ITEMS:
            continue
        else:
            raise invalid(f"{where}.type {kind!r} is not supported (message, function_call, "
                          "function_call_output and reasoning items are)", param=f"{where}.type")
    return out


@dataclass
class Tools:
    """A request's tools as the model sees them: function tools, and those of ``namespace``
    tools under their own names (qualified ``namespace.name`` only where two would clash);
    ``namespaces`` maps such a visible name back to its (namespace, name). Tools of other types
    (hosted ones such as web search, custom grammars) cannot run here: they are ``dropped``
    and named in a response header."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    namespaces: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, body: dict[str, Any]) -> "Tools":
        out = cls()
        for i, t in enumerate(fields.objects(body, "tools")):
            where = f"tools[{i}]"
            if t.get("type") == "function":
                out._add(t, where)
            elif t.get("type") == "namespace":
                namespace = fields.get(t, "name", str, where=where, required=True)
                for j, inner in enumerate(fields.objects(t, "tools", where=where)):
                    if inner.get("type") == "function":
                        out._add(inner, f"{where}.tools[{j}]", namespace)
                    else:
                        out.dropped.append(f"{namespace}.{inner.get('type')}")
            else:
                out.dropped.append(str(t.get("type")))
        return out

    def _add(self, spec: dict[str, Any], where: str, namespace: str | None = None) -> None:
        tool = fields.tool(spec, where, "parameters")
        if namespace is not None:
            name = tool["name"]
            if any(t["name"] == name for t in self.specs):
                tool["name"] = f"{namespace}.{name}"
            self.namespaces[tool["name"]] = (namespace, name)
        self.specs.append(tool)

    def visible_name(self, name: str, namespace: str | None) -> str:
        """The name the model knows a (namespace, name) tool by."""
        if namespace is None:
            return name
        for visible, key in self.namespaces.items():
            if key == (namespace, name):
                return visible
        return f"{namespace}.{name}"

    def call_item(self, call: ToolCall, status: str) -> dict[str, Any]:
        """A call as a ``function_call`` output item (its namespace apart, if it has one)."""
        namespace, name = self.namespaces.get(call.name, (None, call.name))
        item = {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                "name": name, "arguments": call.arguments if status == "completed" else "", "status": status}
        return item if namespace is None else {**item, "namespace": namespace}


def tool_choice(body: dict[str, Any], has_tools: bool) -> str:
    """"auto", "none", "required", or the name of the tool that must be called."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = fields.get(choice, "name", str, where="tool_choice", required=True)
    elif choice in ("auto", "none", "required"):
        name = choice
    else:
        raise invalid('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                      param="tool_choice")
    if name not in ("auto", "none") and not has_tools:
        raise invalid(f"tool_choice {name!r} needs tools", param="tool_choice")
    return name


def _check_unsupported(body: dict[str, Any]) -> None:
    fmt = fields.get(fields.get(body, "text", dict, {}), "format", dict, {"type": "text"}, where="text")
    if fmt.get("type", "text") != "text":
        raise invalid(f"text.format {fmt.get('type')!r} is not supported: replies are plain text",
                      param="text.format")
    if fields.get(body, "background", bool, False):
        raise invalid("background responses are not supported", param="background")
    if body.get("conversation") is not None:
        raise invalid("conversation objects are not supported: send the history as input, or "
                      "previous_response_id", param="conversation")


def _usage(finished: Finished) -> dict[str, Any]:
    return {
        "input_tokens": finished.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finished.cached_tokens},
        "output_tokens": finished.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _output(message_id: str, finished: Finished, tools: Tools) -> list[dict[str, Any]]:
    """The reply's output items: its text (if any, or if there is nothing else), then its calls."""
    items = []
    if finished.text or not finished.tool_calls:
        items.append(_message_item(message_id, finished.text, "completed"))
    return items + [tools.call_item(c, "completed") for c in finished.tool_calls]


def _reply_message(finished: Finished) -> dict[str, Any]:
    """The reply as the daemon stores it (what ``input_messages`` makes of its output items)."""
    message: dict[str, Any] = {"role": "assistant", "content": finished.text}
    if finished.tool_calls:
        message["tool_calls"] = [c.message_part() for c in finished.tool_calls]
    return message


class ResponsesApi:
    """The endpoints, over the shared ``Gateway``."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        # response id -> (its JSON, the history it ended, without instructions)
        self._kept: lru.LRU = lru.LRU(KEPT_RESPONSES)

    def routes(self) -> list[Route]:
        return [Route("/v1/responses", self.create, methods=["POST"]),
                Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
                Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"])]

    def _kept_response(self, response_id: str, param: str | None = None) -> tuple[dict[str, Any], list]:
        kept = self._kept.get(response_id)
        if kept is None:
            raise HttpError(NOT_FOUND, f"no response {response_id!r} is kept: responses sent with store=false "
                            f"are not, and only the last {KEPT_RESPONSES} are", param=param)
        return kept

    async def retrieve(self, request: Request) -> Response:
        return JSONResponse(self._kept_response(request.path_params["response_id"])[0])

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        self._kept_response(response_id)
        del self._kept[response_id]
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def create(self, request: Request) -> Response:
        gw = self.gateway
        body = await gw.read_json(request)
        named = fields.get(body, "model", str, required=True)
        model = gw.check_model(named)
        _check_unsupported(body)
        previous_id = fields.get(body, "previous_response_id", str)
        history = list(self._kept_response(previous_id, "previous_response_id")[1]) if previous_id else []
        tool_set = Tools.of(body)
        history += input_messages(body, tool_set)
        instructions = fields.get(body, "instructions", str)
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + history
        stream = fields.get(body, "stream", bool, False)
        session = fields.get(body, "prompt_cache_key", str) or fields.get(body, "user", str) or ""
        temperature = fields.get(body, "temperature", float, 1.0)
        top_p = fields.get(body, "top_p", float, 1.0)
        turn = await gw.submit(
            "openai:" + session, messages, tool_set.specs,
            sampling=gw.sampling(temperature, top_p),
            max_tokens=gw.max_tokens(fields.get(body, "max_output_tokens", int)),
            stop=(),
            tool_choice=tool_choice(body, bool(tool_set.specs)),
            model=model,
        )
        head = {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "model": named, "instructions": instructions, "previous_response_id": previous_id,
            "max_output_tokens": body.get("max_output_tokens"), "temperature": temperature, "top_p": top_p,
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": fields.get(body, "parallel_tool_calls", bool, True),
            "text": {"format": {"type": "text"}}, "truncation": body.get("truncation") or "disabled",
            "reasoning": {"effort": None, "summary": None}, "store": fields.get(body, "store", bool, True),
            "metadata": fields.get(body, "metadata", dict, {}), "user": body.get("user"),
            "prompt_cache_key": body.get("prompt_cache_key"), "service_tier": "default",
            "status": "in_progress", "error": None, "incomplete_details": None, "output": [], "usage": None,
        }
        message_id = "msg_" + uuid.uuid4().hex
        if stream:
            started = await gw.until_disconnected(request, turn, lambda: gw.next_event(turn))
            response = gw.stream(turn, started, self._events(turn, head, message_id, history, tool_set))
        else:
            events = await gw.collect(request, turn)
            started, finished = events[0], events[-1]
            response = JSONResponse(self._finish(head, _output(message_id, finished, tool_set), finished, history),
                                    headers=turn_headers(started))
        if tool_set.dropped:
            response.headers[TOOLS_DROPPED_HEADER] = ",".join(tool_set.dropped)
        return response

    def _finish(self, head: dict[str, Any], output: list[dict[str, Any]], finished: Finished,
                history: list) -> dict[str, Any]:
        """The ended response, kept if its request allows."""
        incomplete = finished.finish_reason == "length"
        response = {**head, "status": "incomplete" if incomplete else "completed",
                    "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                    "output": output, "usage": _usage(finished)}
        if head["store"]:
            self._kept[head["id"]] = (response, [*history, _reply_message(finished)])
        return response

    async def _events(self, turn: Turn, head: dict[str, Any], message_id: str, history: list,
                      tools: Tools) -> AsyncIterator[bytes]:
        """The turn as Responses stream events: the response, then the message item as its text
        comes, a function_call item per call, and the response's end."""
        sequence = 0

        def event(kind: str, **data: Any) -> bytes:
            nonlocal sequence
            sequence += 1
            return sse({"type": kind, "sequence_number": sequence - 1, **data}, event=kind)

        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        done: dict[int, dict[str, Any]] = {}  # output index -> finished item
        indices = itertools.count()  # output indices, in the order items are added
        message_index: int | None = None
        text = ""

        def message_done() -> list[bytes]:
            where = {"item_id": message_id, "output_index": message_index, "content_index": 0}
            done[message_index] = item = _message_item(message_id, text, "completed")
            return [event("response.output_text.done", **where, text=text, logprobs=[]),
                    event("response.content_part.done", **where, part=item["content"][0]),
                    event("response.output_item.done", output_index=message_index, item=item)]

        def open_message() -> list[bytes]:
            return [event("response.output_item.added", output_index=message_index,
                          item=_message_item(message_id, "", "in_progress")),
                    event("response.content_part.added", item_id=message_id, output_index=message_index,
                          content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

        try:
            async for item in self.gateway.events(turn):
                if isinstance(item, Text) and item.text:
                    if message_index is None:
                        message_index = next(indices)
                        for chunk in open_message():
                            yield chunk
                    text += item.text
                    yield event("response.output_text.delta", item_id=message_id, output_index=message_index,
                                content_index=0, delta=item.text, logprobs=[])
                if isinstance(item, Text) and item.tool_calls:
                    for call in item.tool_calls:
                        index = next(indices)
                        added = tools.call_item(call, "in_progress")
                        yield event("response.output_item.added", output_index=index, item=added)
                        yield event("response.function_call_arguments.delta", item_id=added["id"],
                                    output_index=index, delta=call.arguments)
                        yield event("response.function_call_arguments.done", item_id=added["id"],
                                    output_index=index, name=call.name, arguments=call.arguments)
                        done[index] = tools.call_item(call, "completed")
                        yield event("response.output_item.done", output_index=index, item=done[index])
                elif isinstance(item, Finished):
                    if message_index is None and not item.tool_calls:
                        message_index = next(indices)  # an empty reply is an empty message
                        for chunk in open_message():
                            yield chunk
                    if message_index is not None:
                        for chunk in message_done():
                            yield chunk
                    response = self._finish(head, [done[i] for i in sorted(done)], item, history)
                    yield event(f"response.{response['status']}", response=response)
        except Exception as exc:  # noqa: BLE001 - the status is sent: the error goes in the stream
            kind, message, _ = classify(exc)
            failed = {**head, "status": "failed",
                      "error": {"code": kind.openai_code or kind.openai_type, "message": message}}
            yield event("response.failed", response=failed)

