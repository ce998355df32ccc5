"""Typed access to a JSON request body (a wrong type is a 400 naming the field), and the
content shapes both APIs share: text parts, tool definitions, tool calls."""

from __future__ import annotations

from typing import Any

from ..reply import ToolCall
from .errors import INVALID, HttpError

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object"}


def get(body: dict[str, Any], name: str, kind: type, default: Any = None, *, where: str = "",
        required: bool = False) -> Any:
    """``body[name]`` checked to be of ``kind`` (``float`` accepts integers, ``int`` and
    ``float`` refuse booleans); ``default`` when it is missing or null, unless ``required``."""
    value = body.get(name, _MISSING) if isinstance(body, dict) else _MISSING
    path = f"{where}.{name}" if where else name
    if value is _MISSING or value is None:
        if required:
            raise HttpError(INVALID, f"{path}: field required", param=path)
        return default
    ok = isinstance(value, (int, float) if kind is float else kind)
    if kind in (int, float) and isinstance(value, bool):
        ok = False
    if not ok:
        raise HttpError(INVALID, f"{path} must be {_TYPE_NAMES.get(kind, kind.__name__)}", param=path)
    return float(value) if kind is float else value


def objects(body: dict[str, Any], name: str, *, where: str = "", required: bool = False) -> list[dict[str, Any]]:
    """``body[name]``, a list of objects (empty when missing)."""
    items = get(body, name, list, [], where=where, required=required)
    path = f"{where}.{name}" if where else name
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HttpError(INVALID, f"{path}[{i}] must be an object", param=f"{path}[{i}]")
    return items


def invalid(message: str, param: str | None = None) -> HttpError:
    """A 400 about the request's content."""
    return HttpError(INVALID, message, param=param)


# Content block types that carry something other than text: this daemon's models read text only.
MEDIA_TYPES = ("image", "image_url", "input_image", "input_audio", "audio", "file", "document")


def text(content: Any, where: str, sep: str = "\n") -> str:
    """A message's text: a string, null (""), or a list of ``{"type": "text", "text"}`` parts
    joined by ``sep``; media parts are a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_TYPES:
            raise invalid(f"{where}[{i}]: {kind} content is not supported: the model reads text only",
                          param=f"{where}[{i}]")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}})",
                          param=f"{where}[{i}]")
        texts.append(part["text"])
    return sep.join(texts)


def tool(spec: dict[str, Any], where: str, schema_key: str) -> dict[str, Any]:
    """A tool definition in the daemon's shape, ``{"name", "description", "parameters"}``, from
    one whose JSON schema is under ``schema_key``."""
    name = get(spec, "name", str, where=where, required=True)
    if not name:
        raise invalid(f"{where}.name must not be empty", param=f"{where}.name")
    return {
        "name": name,
        "description": get(spec, "description", str, "", where=where),
        "parameters": get(spec, schema_key, dict, {"type": "object", "properties": {}}, where=where),
    }



def tool_call(call_id: str, name: str, arguments_json: str, where: str) -> dict[str, Any]:
    """A tool call of an assistant message, as the daemon stores the calls it makes
    (``ToolCall.message_part``), so that a resent history matches the stored one."""
    if not name:
        raise invalid(f"{where}: a tool call needs a name", param=where)
    try:
        part = ToolCall(call_id, name, arguments_json or "{}").message_part()
    except (ValueError, RecursionError):
        raise invalid(f"{where}: the arguments are not JSON", param=where) from None
    if not isinstance(part["function"]["arguments"], dict):
        raise invalid(f"{where}: the arguments must be a JSON object", param=where)
    return part
