"""The reply stream: text equal to decode, stop strings, and tool calls parsed by mlx-lm's
parsers from recorded outputs in the formats of real tool-calling model families, fed token
by token through the default model's tokenizer (so markers arrive split across tokens)."""

from __future__ import annotations

import importlib
import json

import pytest

from mlxkvd.reply import Reply, ToolFormat

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# (mlx-lm parser module, a model family that writes it, recorded output)
RECORDED = [
    ("json_tools", "Qwen2.5 / Hermes",
     'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("qwen3_coder", "Qwen3-Coder",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"),
    ("mistral", "Mistral / Devstral",
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ("pythonic", "LFM2", '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'),
    ("glm47", "GLM-4.7",
     "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"),
    ("kimi_k2", "Kimi K2",
     '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
     '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'),
    ("minimax_m2", "MiniMax-M2",
     '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
     "</invoke>\n</minimax:tool_call>"),
    ("function_gemma", "FunctionGemma",
     "<start_function_call>call:get_weather{city:<escape>Paris<escape>}<end_function_call>"),
    ("gemma4", "Gemma 4", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'),
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model_dir)


def tool_format(module: str) -> ToolFormat:
    m = importlib.import_module(f"mlx_lm.tool_parsers.{module}")
    return ToolFormat(m.tool_call_start, m.tool_call_end, m.parse_tool_call)


def stream(tokenizer, text: str, *, eos: bool = True, **kwargs):
    """Feed ``text``'s ids one by one; returns the reply, the streamed content and calls."""
    reply = Reply(tokenizer, **kwargs)
    content, calls = "", []
    for token in tokenizer.encode(text, add_special_tokens=False):
        piece, done = reply.add(token)
        content, calls = content + piece, calls + done
        if reply.stopped:
            break
    piece, done = reply.finish(cut=not eos)
    return reply, content + piece, calls + done


@pytest.mark.parametrize("module,family,text", RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_tool_calls_are_parsed_and_taken_out_of_the_text(tokenizer, module, family, text):
    reply, content, calls = stream(tokenizer, text, tool_format=tool_format(module), tools=TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})], family
    assert calls == reply.tool_calls and calls[0].id
    assert content == reply.content == text[: text.index(tool_format(module).start)]
    message = reply.message()
    assert message["tool_calls"] == [{"id": calls[0].id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_text_after_a_call_and_several_calls(tokenizer):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    text = "First " + call % "Paris" + " then " + call % "Rome" + " done."
    reply, content, calls = stream(tokenizer, text, tool_format=tool_format("json_tools"))
    assert content == "First  then  done."
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c.id for c in calls}) == 2


def test_a_call_cut_by_max_tokens_stays_in_the_text(tokenizer):
    text = 'Sure.<tool_call>\n{"name": "get_weather", "argum'
    reply, content, calls = stream(tokenizer, text, eos=False, tool_format=tool_format("json_tools"))
    assert calls == [] and reply.tool_calls == []
    assert content == reply.content == text


def test_a_marker_split_across_tokens_is_held_back_until_decided(tokenizer):
    fmt = tool_format("json_tools")
    reply = Reply(tokenizer, tool_format=fmt)
    seen = ""
    for token in tokenizer.encode("a <tool", add_special_tokens=False):
        seen += reply.add(token)[0]
    assert "<tool" not in seen  # could still become a marker
    seen += reply.finish(cut=False)[0]
    assert seen == "a <tool"  # it did not


def test_without_a_tool_format_calls_are_plain_text(tokenizer):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    reply, content, calls = stream(tokenizer, text)
    assert content == text and calls == [] and "tool_calls" not in reply.message()


def test_a_forced_prefix_belongs_to_the_call(tokenizer):
    fmt = tool_format("json_tools")
    rest = '"get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    reply, content, calls = stream(tokenizer, rest, tool_format=fmt, prefix='<tool_call>\n{"name": ')
    assert content == "" and [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize("text,stop,expected", [
    ("Hello world. Bye.", ["world"], "Hello "),
    ("one two three", ["two", "one"], ""),
    ("no stop here", ["zzz"], "no stop here"),
    ("ab\u00e9cd", ["\u00e9c"], "ab"),
])
def test_stop_strings_cut_the_text_and_hold_back_their_starts(tokenizer, text, stop, expected):
    reply, content, _ = stream(tokenizer, text, stop=stop)
    assert content == reply.content == expected
    assert reply.stopped == (expected != text)


def test_a_stop_string_inside_a_call_ends_the_reply_there(tokenizer):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "STOP"}}\n</tool_call>'
    reply, content, calls = stream(tokenizer, text, stop=["STOP"], tool_format=tool_format("json_tools"))
    assert reply.stopped and calls == []
    assert content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'


def test_text_equals_decode_of_the_ids(tokenizer):
    text = " Leading space, \u00e9t\u00e9, \u4f60\u597d, \U0001f600 and code:\n    x = 1\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    reply, content, _ = stream(tokenizer, text)
    assert content == tokenizer.decode(ids)
