"""A conversation on which the default model, with the bundled ``chatml-tools`` template, calls
a tool (greedy): earlier turns show it calling ``get_weather``, and it does so again for a new
city. Shared by the tool round-trip tests of every API."""

from __future__ import annotations

import json

TEMPLATE = "chatml-tools"  # mlxkvd serve --chat-template chatml-tools

GET_WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [GET_WEATHER]  # mlxkv's shape: {name, description, parameters}


def call(call_id: str, city: str) -> dict:
    """An assistant message that called get_weather (OpenAI's shape, arguments as an object)."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}


def history() -> list[dict]:
    """The turns before the one that calls the tool for Paris."""
    return [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "Weather in London?"},
        call("call_1", "London"),
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
        {"role": "assistant", "content": "It is 12 C and rainy in London."},
        {"role": "user", "content": "Weather in Rome?"},
        call("call_2", "Rome"),
    ]


QUESTION = "Weather in Paris?"  # the model answers it with get_weather({"city": "Paris"})
RESULT = "18 C, clouds"  # what the tool returns


def arguments(call) -> dict:
    """A call's arguments, whichever shape it comes in."""
    args = call["function"]["arguments"] if isinstance(call, dict) else call.arguments
    return json.loads(args) if isinstance(args, str) else args
