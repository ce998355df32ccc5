"""Conversions between the Python API's plain values and the protobufs: messages, tool calls,
tools, sampling parameters, and the enums' short names.

Messages are dicts in OpenAI's chat shape, so that transcripts can be saved as JSON and come
from, or go to, other tools unchanged::

    {"role": "system" | "user" | "assistant" | "tool", "content": str,
     "name": str,            # role "tool", optional: the tool's name
     "tool_call_id": str,    # role "tool": the call this is the result of
     "tool_calls": [         # role "assistant": the calls it made
         {"id": str, "type": "function", "function": {"name": str, "arguments": str}}]}

A tool call's ``arguments`` is a JSON object text, as OpenAI gives it (a dict is accepted too,
and sent as its JSON text). The enum tables are derived from the generated descriptors, so a
value added to the proto gets its name here without an edit; the daemon shares them.

Imports only protobuf: no gRPC, no MLX.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from mlxkv.v1 import inference_pb2 as pb

# --- enums ----------------------------------------------------------------------------------


def _short_names(enum: EnumTypeWrapper, prefix: str) -> dict[int, str]:
    """Enum value -> its name without ``prefix``, in lower case; UNSPECIFIED (0) is left out."""
    return {value: name.removeprefix(prefix).lower() for name, value in enum.items() if value != 0}


# pb.FINISH_REASON_STOP -> "stop", and "length", "stop_string", "tool_calls".
FINISH_REASON_NAMES: dict[int, str] = _short_names(pb.FinishReason, "FINISH_REASON_")
FINISH_REASON_VALUES: dict[str, int] = {name: value for value, name in FINISH_REASON_NAMES.items()}
# pb.CACHE_SOURCE_NONE -> "none", and "conversation", "shared_prefix", "disk", "checkpoint".
CACHE_SOURCE_NAMES: dict[int, str] = _short_names(pb.CacheSource, "CACHE_SOURCE_")
CACHE_SOURCE_VALUES: dict[str, int] = {name: value for value, name in CACHE_SOURCE_NAMES.items()}


# --- messages -------------------------------------------------------------------------------

_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})


def message_to_proto(message: Mapping[str, Any]) -> pb.Message:
    """A message dict (see the module docstring) -> ``Message``; ValueError if malformed."""
    unknown = set(message) - _MESSAGE_KEYS
    if unknown:
        raise ValueError(f"unsupported message keys: {sorted(unknown)}")
    role = message.get("role")
    if not role:
        raise ValueError("a message needs a role")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError("a message's content must be a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise ValueError(f"only assistant messages carry tool_calls, not {role!r} ones")
    if tool_calls is not None and not isinstance(tool_calls, (list, tuple)):
        raise ValueError("a message's tool_calls must be a list")
    return pb.Message(
        role=role,
        content=content or "",
        name=message.get("name") or "",
        tool_call_id=message.get("tool_call_id") or "",
        tool_calls=[tool_call_to_proto(call) for call in tool_calls or ()],
    )


def message_from_proto(message: pb.Message) -> dict[str, Any]:
    """``Message`` -> dict, with the optional keys only when set."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [tool_call_from_proto(call) for call in message.tool_calls]
    return out


# --- tool calls -----------------------------------------------------------------------------


def tool_call_to_proto(call: Mapping[str, Any]) -> pb.ToolCall:
    """``{"id", "type": "function", "function": {"name", "arguments"}}`` -> ``ToolCall``.

    ``arguments`` is a JSON object text, kept as it is, or a dict, sent as its JSON text;
    missing, it is ``{}``. ValueError when it is not a JSON object.
    """
    if not isinstance(call, Mapping):
        raise ValueError(f"a tool call must be a dict, not {type(call).__name__}")
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise ValueError("a tool call must be of type 'function' with a 'function' object")
    name = function.get("name")
    if not name or not isinstance(name, str):
        raise ValueError("a tool call needs a name")
    call_id = call.get("id") or ""
    if not isinstance(call_id, str):
        raise ValueError(f"the id of tool call {name!r} must be a string")
    return pb.ToolCall(
        id=call_id,
        name=name,
        arguments_json=_arguments_json(name, function.get("arguments")),
    )


def tool_call_from_proto(call: pb.ToolCall) -> dict[str, Any]:
    """``ToolCall`` -> OpenAI's shape, ``arguments`` as the daemon's JSON text."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


def _arguments_json(name: str, arguments: Any) -> str:
    if arguments is None or arguments == "":
        return "{}"
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError as exc:
            raise ValueError(f"the arguments of tool call {name!r} are not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"the arguments of tool call {name!r} must be a JSON object, not {arguments!r}")
        return arguments
    if not isinstance(arguments, Mapping):
        raise ValueError(f"the arguments of tool call {name!r} must be a dict or a JSON object text")
    try:
        return json.dumps(dict(arguments), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the arguments of tool call {name!r} are not JSON-serialisable: {exc}") from None


# --- tools and sampling ---------------------------------------------------------------------


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


def sampling_to_proto(params: Mapping[str, Any]) -> pb.SamplingParams:
    """``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed`` -> ``SamplingParams``; other
    keys are ignored, missing ones are the daemon's defaults (greedy)."""
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
