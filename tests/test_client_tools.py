"""Tool calls in the client library and the CLI, without a daemon and without MLX.

The conversions are tested as functions; the conversation's behaviour against a real gRPC
server on a temporary Unix socket, running a servicer that stores transcripts as the daemon
does (the assistant message with its tool calls) and answers from a script.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest

from mlxkv import Conversation, ToolCall
from mlxkv import cli
from mlxkv.convert import (
    CACHE_SOURCE_NAMES,
    CACHE_SOURCE_VALUES,
    FINISH_REASON_NAMES,
    FINISH_REASON_VALUES,
    message_from_proto,
    message_to_proto,
    tool_call_from_proto,
    tool_call_to_proto,
)
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc
from conftest import serve_fake

WEATHER = {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = pb.ToolCall(id="call_1", name="weather", arguments_json='{"city": "Paris"}')
OPENAI_CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


# --- a daemon stand-in that stores transcripts -----------------------------------------------


class ToolInference(pb_grpc.InferenceServicer):
    """Stores each conversation's messages and revision as the daemon does, and answers with
    the next scripted reply: ``(text, tool calls)``; "plain answer" when the script is empty.

    ``forget()`` simulates a restart. ``tools_ignored`` is what Start says of a request that
    sends tools.
    """

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.stored: dict[str, tuple[int, list[pb.Message]]] = {}
        self.replies: list[tuple[str, list[pb.ToolCall]]] = []
        self.tools_ignored = False
        self.counter = 0
        self._lock = threading.Lock()

    def forget(self) -> None:
        self.stored.clear()

    def Generate(self, request, context):
        with self._lock:
            self.requests.append(request)
            cid = request.conversation_id
            history: list[pb.Message] = []
            if not request.reset:
                revision, history = self.stored.get(cid, (None, []))
                if revision != request.base_revision:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"conversation {cid} is not at that revision")
            text, calls = self.replies.pop(0) if self.replies else ("plain answer", [])
            self.counter += 1
            revision = 100 + self.counter if cid else 0
        yield pb.GenerateResponse(start=pb.Start(conversation_id=cid, prompt_tokens=8, prefill_tokens=8,
                                                 tools_ignored=self.tools_ignored and bool(request.tools)))
        if text:
            yield pb.GenerateResponse(delta=pb.Delta(text=text, token_ids=[1]))
        if calls:
            # A tool call's text is not in Delta.text: only its tokens and the parsed call.
            yield pb.GenerateResponse(delta=pb.Delta(token_ids=[2, 3], tool_calls=calls))
        if cid:
            assistant = pb.Message(role="assistant", content=text, tool_calls=calls)
            self.stored[cid] = (revision, [*history, *request.messages, assistant])
        yield pb.GenerateResponse(done=pb.Done(
            finish_reason=pb.FINISH_REASON_TOOL_CALLS if calls else pb.FINISH_REASON_STOP,
            revision=revision, text=text, tool_calls=calls,
            usage=pb.Usage(prompt_tokens=8, prefill_tokens=8, completion_tokens=3)))


@pytest.fixture
def daemon(sock: Path):
    servicer = ToolInference()
    server = serve_fake(sock, servicer)
    yield servicer
    server.stop(None)


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER]))
    return path


# --- conversions ----------------------------------------------------------------------------


def test_enum_tables_name_every_value_both_ways():
    assert FINISH_REASON_NAMES == {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                                   pb.FINISH_REASON_STOP_STRING: "stop_string",
                                   pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
    assert CACHE_SOURCE_NAMES == {pb.CACHE_SOURCE_NONE: "none", pb.CACHE_SOURCE_CONVERSATION: "conversation",
                                  pb.CACHE_SOURCE_SHARED_PREFIX: "shared_prefix", pb.CACHE_SOURCE_DISK: "disk",
                                  pb.CACHE_SOURCE_CHECKPOINT: "checkpoint"}
    assert FINISH_REASON_VALUES["tool_calls"] == pb.FINISH_REASON_TOOL_CALLS
    assert CACHE_SOURCE_VALUES["shared_prefix"] == pb.CACHE_SOURCE_SHARED_PREFIX
    assert len(FINISH_REASON_VALUES) == len(pb.FinishReason.values()) - 1  # all but UNSPECIFIED
    assert len(CACHE_SOURCE_VALUES) == len(pb.CacheSource.values()) - 1


def test_transcript_with_tool_calls_round_trips():
    transcript = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [OPENAI_CALL]},
        {"role": "tool", "content": '{"temp": 21}', "name": "weather", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "21 degrees."},
    ]
    protos = [message_to_proto(m) for m in transcript]
    assert list(protos[1].tool_calls) == [CALL] and protos[2].tool_call_id == "call_1"
    assert [message_from_proto(p) for p in protos] == transcript
    assert tool_call_to_proto(tool_call_from_proto(CALL)) == CALL


def test_tool_call_arguments_text_is_kept_and_a_dict_becomes_json():
    # The daemon's exact text is kept, spacing and key order included: a re-sent transcript
    # renders the same prompt.
    text = '{"b":1,  "a": "é"}'
    assert tool_call_to_proto({"id": "x", "type": "function",
                               "function": {"name": "f", "arguments": text}}).arguments_json == text
    from_dict = tool_call_to_proto({"id": "x", "function": {"name": "f", "arguments": {"city": "Zürich"}}})
    assert json.loads(from_dict.arguments_json) == {"city": "Zürich"}
    no_arguments = tool_call_to_proto({"id": "x", "function": {"name": "f"}})
    assert no_arguments.arguments_json == "{}"
    assert tool_call_from_proto(from_dict)["function"]["arguments"] == from_dict.arguments_json


@pytest.mark.parametrize(("arguments", "message"), [
    ("{not json", "are not JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"text"', "must be a JSON object"),
    (42, "must be a dict or a JSON object text"),
    ({"when": {1, 2}}, "not JSON-serialisable"),
])
def test_bad_tool_call_arguments_are_a_clear_value_error(arguments, message):
    call = {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    with pytest.raises(ValueError, match=message) as info:
        message_to_proto({"role": "assistant", "content": "", "tool_calls": [call]})
    assert "'lookup'" in str(info.value)


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "x", "tool_calls": [OPENAI_CALL]},  # only assistants call tools
    {"role": "assistant", "content": "", "tool_calls": OPENAI_CALL},  # not a list
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "code", "function": {"name": "f"}}]},
    {"role": "assistant", "content": "", "tool_calls": [{"id": 7, "function": {"name": "f"}}]},
    {"role": "assistant", "content": "", "tool_calls": ["weather()"]},
])
def test_malformed_tool_calls_are_rejected(message):
    with pytest.raises(ValueError):
        message_to_proto(message)


def test_tool_call_arguments_parse_on_demand():
    call = ToolCall("call_1", "weather", '{"city": "Paris"}')
    assert call.arguments == {"city": "Paris"} and ToolCall("c", "f", "").arguments == {}


# --- conversations with tool calls ----------------------------------------------------------


def test_a_turn_that_calls_a_tool(client, daemon):
    daemon.replies.append(("Let me check.", [CALL]))
    conv = client.conversation("c", tools=[WEATHER])
    turn = conv.send("Weather in Paris?")
    assert turn.finish_reason == "tool_calls" and turn.text == "Let me check."
    assert turn.tool_calls == [ToolCall("call_1", "weather", '{"city": "Paris"}')]
    assert turn.tool_calls[0].arguments == {"city": "Paris"} and turn.tools_ignored is False
    assert turn.token_ids == [1, 2, 3]
    assert conv.messages[-1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [OPENAI_CALL]}
    assert [t.name for t in daemon.requests[0].tools] == ["weather"]


def test_send_tool_results_answers_the_calls_in_a_delta_turn(client, daemon):
    second = pb.ToolCall(id="call_2", name="clock", arguments_json="{}")
    daemon.replies += [("", [CALL, second]), ("21 degrees at noon.", [])]
    conv = client.conversation("c", tools=[WEATHER])
    conv.send("Weather and time?")
    turn = conv.send_tool_results([{"tool_call_id": "call_1", "content": {"temp": 21}},
                                   {"tool_call_id": "call_2", "content": "12:00"}])
    request = daemon.requests[-1]
    assert not request.reset and request.base_revision == 101
    assert [message_from_proto(m) for m in request.messages] == [
        {"role": "tool", "content": '{"temp": 21}', "name": "weather", "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "name": "clock", "tool_call_id": "call_2"}]
    assert turn.finish_reason == "stop" and turn.tool_calls == [] and conv.revision == 102
    assert conv.messages[-1] == {"role": "assistant", "content": "21 degrees at noon."}
    # What the client holds is what the daemon stored, message for message.
    assert [message_to_proto(m) for m in conv.messages] == daemon.stored["c"][1]


def test_tool_results_must_answer_calls_of_the_last_answer(client, daemon):
    conv = client.conversation("c")
    with pytest.raises(ValueError, match="not an assistant message with tool calls"):
        conv.send_tool_results([{"tool_call_id": "call_1", "content": "x"}])
    conv.send("hi")  # a plain answer: no calls to answer either
    with pytest.raises(ValueError, match="not an assistant message with tool calls"):
        conv.send_tool_results([{"tool_call_id": "call_1", "content": "x"}])
    daemon.replies.append(("", [CALL]))
    conv.send("weather?")
    with pytest.raises(ValueError, match="no tool call 'call_9'"):
        conv.send_tool_results([{"tool_call_id": "call_9", "content": "x"}])
    with pytest.raises(ValueError, match="no tool results"):
        conv.send_tool_results([])
    assert len(daemon.requests) == 2


def test_tool_messages_can_also_go_through_send_and_stream(client, daemon):
    daemon.replies += [("", [CALL]), ("Sunny.", [])]
    conv = client.conversation("c")
    conv.send("weather?")
    messages = conv.tool_result_messages([{"tool_call_id": "call_1", "content": "sunny", "name": "meteo"}])
    assert messages == [{"role": "tool", "content": "sunny", "name": "meteo", "tool_call_id": "call_1"}]
    assert list(conv.stream(None, extra_messages=messages)) == ["Sunny."]
    assert conv.last_turn is not None and conv.last_turn.text == "Sunny."
    assert conv.messages[-2] == messages[0]


def test_stream_yields_text_only_and_last_turn_has_the_calls(client, daemon):
    daemon.replies.append(("Checking.", [CALL]))
    conv = client.conversation("c")
    assert list(conv.stream("weather?")) == ["Checking."]
    assert conv.last_turn is not None and conv.last_turn.tool_calls[0].id == "call_1"


def test_resend_after_a_restart_carries_the_calls_as_the_daemon_stored_them(client, daemon):
    daemon.replies.append(("Let me check.", [CALL]))
    conv = client.conversation("c", system="be brief", tools=[WEATHER])
    conv.send("Weather in Paris?")
    stored = list(daemon.stored["c"][1])
    daemon.forget()
    turn = conv.send_tool_results([{"tool_call_id": "call_1", "content": "sunny"}])
    rejected, resent = daemon.requests[1], daemon.requests[2]
    assert not rejected.reset and turn.resent
    assert resent.reset and list(resent.messages) == [*stored, *rejected.messages]
    assert [t.name for t in resent.tools] == ["weather"]


def test_tool_choice_is_a_conversation_default_and_a_turn_option(client, daemon):
    conv = client.conversation("c", tools=[WEATHER], tool_choice="required")
    conv.send("one")
    conv.send("two", tool_choice="none")
    conv.send("three")
    assert [r.tool_choice for r in daemon.requests] == ["required", "none", "required"]
    client.conversation("d").send("four")
    assert daemon.requests[-1].tool_choice == ""
    with pytest.raises(TypeError):
        conv.send("five", tool_chooser="auto")


def test_tools_ignored_comes_from_start(client, daemon):
    daemon.tools_ignored = True
    turn = client.ask("weather?", tools=[WEATHER])
    assert turn.tools_ignored is True
    assert daemon.requests[-1].conversation_id == "" and [t.name for t in daemon.requests[-1].tools] == ["weather"]


def test_a_saved_transcript_keeps_its_tool_calls(client, daemon):
    daemon.replies.append(("", [CALL]))
    conv = client.conversation("c", tools=[WEATHER])
    conv.send("weather?")
    restored = Conversation.from_dict(client, json.loads(json.dumps(conv.to_dict())))
    assert restored.messages == conv.messages and restored.messages[-1]["tool_calls"] == [OPENAI_CALL]
    restored.send_tool_results([{"tool_call_id": "call_1", "content": "sunny"}])
    assert not daemon.requests[-1].reset and restored.revision == 102


# --- the CLI --------------------------------------------------------------------------------


def test_cli_ask_prints_the_tool_calls_after_the_text(sock, daemon, tools_file, data_dir, capsys):
    daemon.replies.append(("Let me check.", [CALL]))
    argv = ["--socket", str(sock), "ask", "Weather in Paris?", "--tools", str(tools_file), "--tool-choice", "auto"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == 'Let me check.\n[tool call] weather({"city": "Paris"})\n'
    request = daemon.requests[-1]
    assert [t.name for t in request.tools] == ["weather"] and request.tool_choice == "auto"
    assert json.loads(request.tools[0].parameters_json) == WEATHER["parameters"]


def test_cli_prints_a_call_without_text_on_its_own_line_and_warns_when_tools_are_ignored(
        sock, daemon, tools_file, data_dir, capsys):
    daemon.replies.append(("", [CALL]))
    daemon.tools_ignored = True
    assert cli.main(["--socket", str(sock), "ask", "weather?", "--tools", str(tools_file)]) == 0
    out, err = capsys.readouterr()
    assert out == '[tool call] weather({"city": "Paris"})\n'
    assert "does not render tools" in err


def test_cli_tools_of_a_saved_conversation(sock, daemon, tools_file, data_dir, capsys, tmp_path):
    base = ["--socket", str(sock), "ask", "-c", "proj"]
    assert cli.main([*base, "one", "--tools", str(tools_file)]) == 0
    assert cli.main([*base, "two"]) == 0  # the saved tools stay; the daemon keeps its copy
    assert cli.main([*base, "three", "--tools", str(tools_file)]) == 0  # the same tools: no edit
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"name": "clock"}]))
    assert cli.main([*base, "four", "--tools", str(other)]) == 0  # new tools: re-sent with reset
    first, second, third, fourth = daemon.requests
    assert first.reset and [t.name for t in first.tools] == ["weather"]
    assert not second.reset and not second.tools and not third.reset
    assert fourth.reset and [t.name for t in fourth.tools] == ["clock"] and len(fourth.messages) == 7


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot read the tools"),
    ('{"name": "f"}', "must hold a JSON list"),
    ('[{"description": "no name"}]', "tool 0: a tool needs a name"),
])
def test_cli_rejects_a_bad_tools_file(sock, daemon, tmp_path, capsys, content, message):
    path = tmp_path / "tools.json"
    path.write_text(content)
    assert cli.main(["--socket", str(sock), "ask", "hi", "--tools", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlxkv: error: ") and message in err and "Traceback" not in err
    assert daemon.requests == []


def test_cli_missing_tools_file(sock, daemon, tmp_path, capsys):
    assert cli.main(["--socket", str(sock), "chat", "--tools", str(tmp_path / "none.json")]) == 1
    assert "cannot read the tools" in capsys.readouterr().err


def test_parse_tool_options():
    parser = cli.build_parser()
    chat = parser.parse_args(["chat", "--tools", "t.json", "--tool-choice", "weather"])
    assert (chat.tools, chat.tool_choice) == ("t.json", "weather")
    ask = parser.parse_args(["ask", "hi"])
    assert (ask.tools, ask.tool_choice) == (None, None)
