"""The OpenAI API of the HTTP gateway, through the official ``openai`` SDK, on a real daemon.

Each test resends the whole history every turn, as SDK users do: the daemon finds the stored
conversation and reuses its cache, and greedy text equals mlx-lm's with no cache and the gRPC
path's on the same messages.
"""

from __future__ import annotations

import json

import openai
import pytest

import httpd
import toolchat
from mlxkv import Client

pytestmark = pytest.mark.model

SYSTEM = "You are a concise assistant."
QUESTIONS = ["Name a primary colour.", "Name another one.", "Which fruit is yellow?", "Say goodbye."]
MAX_TOKENS = 12
SLACK = 8  # template tokens a re-render may rewrite (the end of the previous reply)
TOOLS_IGNORED = "X-Mlxkv-Tools-Ignored"  # "true" when the chat template renders none of the tools sent


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("openai"), cache_dir)
    yield d
    d.daemon.stop()


@pytest.fixture(scope="module")
def tools_served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("openai-tools"), cache_dir, "--chat-template", toolchat.TEMPLATE)
    yield d
    d.daemon.stop()


def sdk(served: httpd.HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=120)


def complete(client: openai.OpenAI, messages: list, *, stream: bool, **options) -> dict:
    """One turn, streamed or not: its message (as a client sends it back), finish reason, usage."""
    options = {"model": httpd.MODEL, "messages": messages, "temperature": 0, **options}
    if not stream:
        response = client.chat.completions.create(**options)
        choice = response.choices[0]
        return {"message": choice.message.model_dump(), "finish": choice.finish_reason, "usage": response.usage}
    content, calls, finish, usage, roles = "", {}, None, None, []
    for chunk in client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                calls.setdefault(call.index, {"id": call.id, "type": "function",
                                              "function": {"name": call.function.name, "arguments": ""}})
                calls[call.index]["function"]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]  # the first chunk, and only it, says the role
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": message, "finish": finish, "usage": usage}


def openai_shape(messages: list[dict]) -> list[dict]:
    """mlxkv's messages (tool call arguments as objects) as OpenAI's (as JSON text)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_four_turn_chat_reuses_the_cache_and_matches_reference_and_grpc(served, reference, stream):
    client = sdk(served)
    messages = [{"role": "system", "content": SYSTEM}]
    with Client(served.daemon.socket, timeout=120) as grpc_client:
        grpc_chat = grpc_client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        previous = None
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            turn = complete(client, messages, stream=stream, max_tokens=MAX_TOKENS, prompt_cache_key=f"chat-{stream}")
            text = turn["message"]["content"]
            usage = turn["usage"]
            assert turn["finish"] in ("stop", "length")
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            if previous is not None:
                assert usage.prompt_tokens_details.cached_tokens >= (
                    previous.prompt_tokens + previous.completion_tokens - SLACK)
            expected = reference.tokenizer.decode(reference.generate(messages, MAX_TOKENS))
            assert text == expected
            assert grpc_chat.send(question).text == text
            messages.append(turn["message"])
            previous = usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_round_trip_reuses_the_cache(tools_served, tools_reference, stream):
    client = sdk(tools_served)
    tools = [{"type": "function", "function": t} for t in toolchat.TOOLS]
    messages = openai_shape(toolchat.history()) + [{"role": "user", "content": toolchat.QUESTION}]
    called = complete(client, messages, stream=stream, tools=tools, max_tokens=40, user=f"tools-{stream}")
    assert called["finish"] == "tool_calls"
    assert called["message"]["content"] is None
    [call] = called["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert toolchat.arguments(call) == {"city": "Paris"}

    messages += [called["message"], {"role": "tool", "tool_call_id": call["id"], "content": toolchat.RESULT}]
    answered = complete(client, messages, stream=stream, tools=tools, max_tokens=16, user=f"tools-{stream}")
    assert answered["finish"] in ("stop", "length")
    assert answered["message"]["content"]
    first = called["usage"]
    assert answered["usage"].prompt_tokens_details.cached_tokens >= first.prompt_tokens + first.completion_tokens - SLACK
    ours = toolchat.history() + [
        {"role": "user", "content": toolchat.QUESTION},
        toolchat.call(call["id"], "Paris"),
        {"role": "tool", "tool_call_id": call["id"], "content": toolchat.RESULT},
    ]
    ours[-2]["content"] = ""
    expected = tools_reference.tokenizer.decode(tools_reference.generate(ours, 16, tools=toolchat.TOOLS))
    assert answered["message"]["content"] == expected


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_needs_a_template_that_renders_tools(served, choice):
    with pytest.raises(openai.BadRequestError, match="renders no tools"):
        sdk(served).chat.completions.create(
            model=httpd.MODEL, messages=[{"role": "user", "content": toolchat.QUESTION}],
            tools=[{"type": "function", "function": t} for t in toolchat.TOOLS], tool_choice=choice, max_tokens=8)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tools_the_template_renders_nowhere_are_reported_in_a_header(served, tools_served, stream):
    tools = [{"type": "function", "function": toolchat.GET_WEATHER}]

    def turn(daemon, **options):
        """One turn through the SDK's raw response: its headers and finish reason."""
        options = {"model": httpd.MODEL, "messages": [{"role": "user", "content": toolchat.QUESTION}],
                   "temperature": 0, "max_tokens": 4, **options}
        completions = sdk(daemon).chat.completions
        if not stream:
            response = completions.with_raw_response.create(**options)
            return response.headers, response.parse().choices[0].finish_reason
        with completions.with_streaming_response.create(**options, stream=True) as response:
            return response.headers, [c.choices[0].finish_reason for c in response.parse() if c.choices][-1]

    # The default model's own template (served: no --chat-template) renders no tools.
    headers, finish = turn(served, tools=tools)
    assert headers[TOOLS_IGNORED] == "true"
    assert finish in ("stop", "length")  # no call is looked for
    assert TOOLS_IGNORED not in turn(served)[0]
    assert TOOLS_IGNORED not in turn(tools_served, tools=tools)[0]


def test_two_conversations_under_one_prompt_cache_key_keep_their_caches(served):
    client = sdk(served)
    chats = {name: [{"role": "system", "content": f"You are {name}, a concise assistant."}]
             for name in ("Ada", "Bob")}
    previous: dict[str, object] = {}
    for question in QUESTIONS[:3]:
        for name, messages in chats.items():
            messages.append({"role": "user", "content": question})
            turn = complete(client, messages, stream=False, max_tokens=8, prompt_cache_key="one-key")
            usage = turn["usage"]
            if name in previous:
                before = previous[name]
                assert usage.prompt_tokens_details.cached_tokens >= before.prompt_tokens + before.completion_tokens - SLACK
                assert usage.prompt_tokens_details.cached_tokens > before.prompt_tokens_details.cached_tokens
            messages.append(turn["message"])
            previous[name] = usage


def test_models_list_the_served_model(served):
    client = sdk(served)
    assert [m.id for m in client.models.list()] == [httpd.MODEL]
    assert client.models.retrieve(httpd.MODEL).id == httpd.MODEL
