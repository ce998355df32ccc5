"""Tool calls end to end through gRPC, on the real default model with the bundled template
that renders tools: the model calls a tool, the client sends the result, the model answers;
every reply equals mlx-lm's from the full prompt, and the cache survives the round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
import pytest

import toolchat
from conftest import Daemon
from mlxkv import Client, MlxkvError

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def tools_daemon(tmp_path_factory, cache_dir, model_dir):
    d = Daemon(
        socket=Path(tempfile.mkdtemp(prefix="mlxkv-")) / "tools.sock",
        cache_dir=cache_dir,
        log_path=tmp_path_factory.mktemp("log") / "daemon.log",
        extra_args=["--max-disk-bytes", "0", "--chat-template", toolchat.TEMPLATE],
    ).start()
    yield d
    d.stop()


def as_template_messages(messages):
    """A transcript as chat templates take it: tool-call arguments as objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {"name": c["function"]["name"],
                                                  "arguments": toolchat.arguments(c)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def test_a_tool_round_trip_is_exact_and_keeps_its_cache(tools_daemon, tools_reference):
    with Client(tools_daemon.socket) as client:
        conv = client.conversation(tools=toolchat.TOOLS, max_tokens=MAX_TOKENS)
        conv.reset(toolchat.history())
        called = conv.send(toolchat.QUESTION)
        assert called.finish_reason == "tool_calls", called
        assert not called.tools_ignored
        [call] = called.tool_calls
        assert call.name == "get_weather" and call.arguments == {"city": "Paris"}
        assert called.text == ""  # the call's text is not the message's content
        asked = as_template_messages(conv.messages[:-1])
        assert called.token_ids == tools_reference.generate(asked, MAX_TOKENS, tools=toolchat.TOOLS)
        # The stored assistant turn is the client's: content plus the structured call.
        stored = client.get_conversation(conv.conversation_id).messages[-1]
        assert stored.role == "assistant" and stored.content == ""
        assert [(c.id, c.name) for c in stored.tool_calls] == [(call.id, "get_weather")]

        answered = conv.send_tool_results([{"tool_call_id": call.id, "content": toolchat.RESULT}])
        assert answered.finish_reason == "stop" and answered.text and not answered.tool_calls
        # The round trip kept the cache: everything up to the end of the call is reused.
        assert answered.cache_source == "conversation"
        assert answered.cached_tokens >= called.prompt_tokens + called.completion_tokens - 2
        history = as_template_messages(conv.messages[:-1])
        assert answered.token_ids == tools_reference.generate(history, MAX_TOKENS, tools=toolchat.TOOLS)


def test_tool_choice_none_leaves_calls_in_the_text(tools_daemon):
    with Client(tools_daemon.socket) as client:
        conv = client.conversation(tools=toolchat.TOOLS, max_tokens=MAX_TOKENS, tool_choice="none")
        conv.reset(toolchat.history())
        turn = conv.send(toolchat.QUESTION)
        assert turn.finish_reason == "stop" and turn.tool_calls == []
        assert "<tool_call>" in turn.text


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_a_required_or_named_tool_choice_makes_the_model_call(tools_daemon, choice):
    with Client(tools_daemon.socket) as client:
        conv = client.conversation(tools=toolchat.TOOLS, max_tokens=MAX_TOKENS)
        conv.reset(toolchat.history())
        assert conv.send("Thanks! How are you?").tool_calls == []  # left free, it chats
        forced = conv.send("Thanks! How are you?", tool_choice=choice)
        assert forced.finish_reason == "tool_calls" and forced.text == ""
        assert [c.name for c in forced.tool_calls] == ["get_weather"]
        after = conv.send_tool_results([{"tool_call_id": forced.tool_calls[0].id, "content": "sunny"}])
        # The forced opening is part of the stored reply: the next turn reuses the cache (where
        # the opening meets the model's text, the re-rendered reply may join a token).
        assert after.cache_source == "conversation"
        assert after.cached_tokens >= forced.prompt_tokens - 1


def test_a_template_without_tools_says_so_and_refuses_a_required_call(shared_daemon):
    with Client(shared_daemon.socket) as client:
        conv = client.conversation(tools=toolchat.TOOLS, max_tokens=4)
        turn = conv.send("Weather in Paris?")
        assert turn.tools_ignored and turn.tool_calls == []
        for choice in ("required", "get_weather"):
            with pytest.raises(MlxkvError) as err:
                conv.send("Weather in Rome?", tool_choice=choice)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "renders no tools" in err.value.details and "--chat-template" in err.value.details
        with pytest.raises(MlxkvError) as err:
            conv.send("Weather in Rome?", tool_choice="no_such_tool")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no_such_tool" in err.value.details
        assert conv.send("Thanks.").revision == turn.revision + 1  # the refusals changed nothing
