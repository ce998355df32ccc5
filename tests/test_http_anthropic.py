"""The Anthropic API of the HTTP gateway, through the official ``anthropic`` SDK, on a real daemon.

Each test resends the whole history every turn, as SDK users do: the daemon finds the stored
conversation and reuses its cache, and greedy text equals mlx-lm's with no cache and the gRPC
path's on the same messages. (This SDK has no ``temperature`` argument: greedy is asked for in
``extra_body``, as the API still takes it.)
"""

from __future__ import annotations

import anthropic
import pytest

import httpd
import toolchat
from mlxkv import Client

pytestmark = pytest.mark.model

SYSTEM = "You are a concise assistant."
QUESTIONS = ["Name a primary colour.", "Name another one.", "Which fruit is yellow?", "Say goodbye."]
MAX_TOKENS = 12
SLACK = 8  # template tokens a re-render may rewrite (the end of the previous reply)
GREEDY = {"temperature": 0}
TOOLS_IGNORED = "X-Mlxkv-Tools-Ignored"  # "true" when the chat template renders none of the tools sent


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("anthropic"), cache_dir)
    yield d
    d.daemon.stop()


@pytest.fixture(scope="module")
def tools_served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("anthropic-tools"), cache_dir, "--chat-template", toolchat.TEMPLATE)
    yield d
    d.daemon.stop()


def sdk(served: httpd.HttpDaemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=served.key, max_retries=0, timeout=120)


def create(client: anthropic.Anthropic, *, stream: bool, **options):
    """One turn, streamed or not; the final Message either way."""
    options = {"model": httpd.MODEL, "extra_body": GREEDY, **options}
    if not stream:
        return client.messages.create(**options)
    with client.messages.stream(**options) as events:
        kinds = [event.type for event in events]
        message = events.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    return message


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def cached(message) -> int:
    return message.usage.cache_read_input_tokens


def prompt_tokens(message) -> int:
    return message.usage.input_tokens + message.usage.cache_read_input_tokens


def anthropic_shape(messages: list[dict]) -> tuple[str, list[dict]]:
    """mlxkv's messages as Anthropic's: the system prompt apart, tool calls as tool_use blocks,
    tool results as tool_result blocks of a user message."""
    system, out = "", []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif m.get("tool_calls"):
            blocks = [{"type": "text", "text": m["content"]}] if m["content"] else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": c["function"]["arguments"]} for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return system, out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_four_turn_chat_reuses_the_cache_and_matches_reference_and_grpc(served, reference, stream):
    client = sdk(served)
    messages: list[dict] = []
    ours = [{"role": "system", "content": SYSTEM}]
    with Client(served.daemon.socket, timeout=120) as grpc_client:
        grpc_chat = grpc_client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        previous = None
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            ours.append({"role": "user", "content": question})
            reply = create(client, stream=stream, system=SYSTEM, messages=messages, max_tokens=MAX_TOKENS,
                           metadata={"user_id": f"chat-{stream}"})
            text = text_of(reply)
            assert reply.stop_reason in ("end_turn", "max_tokens")
            assert reply.usage.cache_creation_input_tokens == 0
            if previous is not None:
                assert cached(reply) >= prompt_tokens(previous) + previous.usage.output_tokens - SLACK
            assert text == reference.tokenizer.decode(reference.generate(ours, MAX_TOKENS))
            assert grpc_chat.send(question).text == text
            messages.append({"role": "assistant", "content": reply.content})
            ours.append({"role": "assistant", "content": text})
            previous = reply


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_round_trip_reuses_the_cache(tools_served, tools_reference, stream):
    client = sdk(tools_served)
    tools = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
             for t in toolchat.TOOLS]
    system, messages = anthropic_shape(toolchat.history())
    messages.append({"role": "user", "content": toolchat.QUESTION})
    # Claude Code's session header names the conversation's session.
    session = {"X-Claude-Code-Session-Id": f"tools-{stream}"}
    called = create(client, stream=stream, system=system, messages=messages, tools=tools, max_tokens=40,
                    extra_headers=session)
    assert called.stop_reason == "tool_use"
    [use] = called.content
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})

    messages += [{"role": "assistant", "content": called.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": [{"type": "text", "text": toolchat.RESULT}]}]}]
    answered = create(client, stream=stream, system=system, messages=messages, tools=tools, max_tokens=16,
                      extra_headers=session)
    assert answered.stop_reason in ("end_turn", "max_tokens")
    assert cached(answered) >= prompt_tokens(called) + called.usage.output_tokens - SLACK
    ours = toolchat.history() + [
        {"role": "user", "content": toolchat.QUESTION},
        toolchat.call(use.id, "Paris"),
        {"role": "tool", "tool_call_id": use.id, "content": toolchat.RESULT},
    ]
    expected = tools_reference.tokenizer.decode(tools_reference.generate(ours, 16, tools=toolchat.TOOLS))
    assert text_of(answered) == expected


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "named"])
def test_forced_tool_choice_needs_a_template_that_renders_tools(served, choice):
    tools = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
             for t in toolchat.TOOLS]
    with pytest.raises(anthropic.BadRequestError, match="renders no tools"):
        sdk(served).messages.create(model=httpd.MODEL, max_tokens=8, tools=tools, tool_choice=choice,
                                    messages=[{"role": "user", "content": toolchat.QUESTION}])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tools_the_template_renders_nowhere_are_reported_in_a_header(served, tools_served, stream):
    weather = toolchat.GET_WEATHER
    tools = [{"name": weather["name"], "description": weather["description"], "input_schema": weather["parameters"]}]

    def turn(daemon, **options):
        """One turn through the SDK's raw response: its headers and stop reason."""
        options = {"model": httpd.MODEL, "messages": [{"role": "user", "content": toolchat.QUESTION}],
                   "extra_body": GREEDY, "max_tokens": 4, **options}
        messages = sdk(daemon).messages
        if not stream:
            response = messages.with_raw_response.create(**options)
            return response.headers, response.parse().stop_reason
        with messages.with_streaming_response.create(**options, stream=True) as response:
            return response.headers, [e.delta.stop_reason for e in response.parse() if e.type == "message_delta"][-1]

    # The default model's own template (served: no --chat-template) renders no tools.
    headers, stop_reason = turn(served, tools=tools)
    assert headers[TOOLS_IGNORED] == "true"
    assert stop_reason in ("end_turn", "max_tokens")  # no call is looked for
    assert TOOLS_IGNORED not in turn(served)[0]
    assert TOOLS_IGNORED not in turn(tools_served, tools=tools)[0]


def billed(system: str, n: int) -> list[dict]:
    """``system`` as Claude Code (2.1.36 on) sends it: after a billing header block whose value
    changes on every request."""
    header = f"x-anthropic-billing-header: cc_version=2.1.37.{n:03x}; cc_entrypoint=cli; cch={n:05x};"
    return [{"type": "text", "text": header}, {"type": "text", "text": system}]


def test_billing_header_changing_per_request_does_not_break_the_conversation(served, reference):
    client = sdk(served)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    first = create(client, stream=False, system=billed(SYSTEM, 1), messages=messages, max_tokens=MAX_TOKENS,
                   metadata={"user_id": "billed"})
    messages += [{"role": "assistant", "content": first.content}, {"role": "user", "content": QUESTIONS[1]}]
    second = create(client, stream=False, system=billed(SYSTEM, 2), messages=messages, max_tokens=MAX_TOKENS,
                    metadata={"user_id": "billed"})
    # The whole first turn is reused: the conversation goes on despite the new header.
    assert cached(second) >= prompt_tokens(first)
    assert cached(second) >= prompt_tokens(first) + first.usage.output_tokens - SLACK
    # And the model saw the system prompt, without the header.
    ours = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": text_of(first)}, {"role": "user", "content": QUESTIONS[1]}]
    assert text_of(second) == reference.tokenizer.decode(reference.generate(ours, MAX_TOKENS))


def test_billing_header_is_dropped_only_first_in_the_system_prompt(served):
    client = sdk(served)
    messages = [{"role": "user", "content": "Count me."}]

    def count(**system) -> int:
        return client.messages.count_tokens(model=httpd.MODEL, messages=messages, **system).input_tokens

    [header, block] = billed(SYSTEM, 3)
    bare = count(system=SYSTEM)
    assert count(system=[header, block]) == bare  # the rest of the system prompt is kept
    assert count(system=header["text"] + "\n" + SYSTEM) == bare  # a string's first line
    assert count(system=[header]) == count()  # no system prompt left: the template's default
    # Anywhere else, or under another name, it is the client's text.
    assert count(system=[block, header]) > bare
    assert count(system=[{"type": "text", "text": " " + header["text"]}, block]) > bare
    assert count(system=[{"type": "text", "text": header["text"].upper()}, block]) > bare


def test_two_conversations_under_one_user_id_keep_their_caches(served):
    client = sdk(served)
    chats: dict[str, list] = {"Ada": [], "Bob": []}
    previous: dict[str, object] = {}
    for question in QUESTIONS[:3]:
        for name, messages in chats.items():
            messages.append({"role": "user", "content": question})
            reply = create(client, stream=False, system=f"You are {name}, a concise assistant.", messages=messages,
                           max_tokens=8, metadata={"user_id": "one-user"})
            if name in previous:
                before = previous[name]
                assert cached(reply) >= prompt_tokens(before) + before.usage.output_tokens - SLACK
                assert cached(reply) > cached(before)
            messages.append({"role": "assistant", "content": reply.content})
            previous[name] = reply


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_sequence_is_reported(served, stream):
    client = sdk(served)
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    free = text_of(create(client, stream=False, messages=messages, max_tokens=MAX_TOKENS))
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]
    reply = create(client, stream=stream, messages=messages, max_tokens=MAX_TOKENS, stop_sequences=["@@@", stop])
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert text_of(reply) == free[: free.index(stop)]


def test_count_tokens_is_the_prompt_a_turn_sends(served):
    client = sdk(served)
    messages = [{"role": "user", "content": "Count me."}]
    counted = client.messages.count_tokens(model=httpd.MODEL, system=SYSTEM, messages=messages).input_tokens
    reply = create(client, stream=False, system=SYSTEM, messages=messages, max_tokens=2)
    assert counted == prompt_tokens(reply)


def test_models_list_the_served_model(served):
    client = sdk(served)
    assert [m.id for m in client.models.list()] == [httpd.MODEL]
    assert client.models.retrieve(httpd.MODEL).id == httpd.MODEL
