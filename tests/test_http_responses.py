"""OpenAI's Responses API of the HTTP gateway (Codex's wire API), through the official ``openai``
SDK's ``client.responses``, on a real daemon.

As Codex does, a client resends the whole history as input items every turn (the previous
output items included), or chains responses by ``previous_response_id``: either way the daemon
continues the stored conversation's cache, and greedy text equals mlx-lm's with no cache and the
gRPC path's on the same messages.
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
TOOLS_DROPPED = "X-Mlxkv-Tools-Dropped"  # the request's tools that cannot run here


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("responses"), cache_dir)
    yield d
    d.daemon.stop()


@pytest.fixture(scope="module")
def tools_served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("responses-tools"), cache_dir, "--chat-template", toolchat.TEMPLATE)
    yield d
    d.daemon.stop()


def sdk(served: httpd.HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=120)


def respond(client: openai.OpenAI, *, stream: bool, **options):
    """One response, whole or through the SDK's stream helper (which checks the event protocol
    as it accumulates); with the text its deltas spelled, for a stream."""
    options = {"model": httpd.MODEL, "temperature": 0, **options}
    if not stream:
        response = client.responses.create(**options)
        return response, response.output_text
    deltas, ended = "", None
    with client.responses.stream(**options) as events:
        for event in events:
            if event.type == "response.output_text.delta":
                deltas += event.delta
            elif event.type in ("response.completed", "response.incomplete", "response.failed"):
                ended = event
        # The helper's accumulated response is there only for a completed one.
        response = events.get_final_response() if ended.type == "response.completed" else ended.response
    return response, deltas


def as_input(items) -> list[dict]:
    """Output items as a client sends them back."""
    return [item.model_dump(exclude_none=True) for item in items]


def text_of(reference, messages: list[dict], max_tokens: int, **options) -> str:
    return reference.tokenizer.decode(reference.generate(messages, max_tokens, **options))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_four_turn_chat_resending_history_reuses_the_cache(served, reference, stream):
    client = sdk(served)
    items: list[dict] = []
    messages = [{"role": "system", "content": SYSTEM}]
    with Client(served.daemon.socket, timeout=120) as grpc_client:
        grpc_chat = grpc_client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        previous = None
        for question in QUESTIONS:
            items.append({"role": "user", "content": question})
            messages.append({"role": "user", "content": question})
            response, deltas = respond(client, stream=stream, instructions=SYSTEM, input=items,
                                       max_output_tokens=MAX_TOKENS, prompt_cache_key=f"responses-{stream}",
                                       store=False)
            assert response.status in ("completed", "incomplete")
            assert response.object == "response" and response.model == httpd.MODEL
            usage = response.usage
            assert usage.total_tokens == usage.input_tokens + usage.output_tokens
            if previous is not None:
                assert usage.input_tokens_details.cached_tokens >= (
                    previous.input_tokens + previous.output_tokens - SLACK)
            text = response.output_text
            if stream:
                assert deltas == text
            assert text == text_of(reference, messages, MAX_TOKENS)
            assert grpc_chat.send(question).text == text
            items += as_input(response.output)
            messages.append({"role": "assistant", "content": text})
            previous = usage


def test_previous_response_id_continues_the_conversation(served, reference):
    client = sdk(served)
    messages = [{"role": "system", "content": SYSTEM}]
    previous = None
    for question in QUESTIONS[:3]:
        messages.append({"role": "user", "content": question})
        response = client.responses.create(
            model=httpd.MODEL, instructions=SYSTEM, input=question, temperature=0, max_output_tokens=MAX_TOKENS,
            previous_response_id=previous.id if previous else None, prompt_cache_key="chained")
        if previous is not None:
            assert response.previous_response_id == previous.id
            assert response.usage.input_tokens_details.cached_tokens >= (
                previous.usage.input_tokens + previous.usage.output_tokens - SLACK)
        assert response.output_text == text_of(reference, messages, MAX_TOKENS)
        messages.append({"role": "assistant", "content": response.output_text})
        previous = response

    kept = client.responses.retrieve(previous.id)
    assert kept.id == previous.id and kept.output_text == previous.output_text
    client.responses.delete(previous.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(previous.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_id|no response"):
        client.responses.create(model=httpd.MODEL, input="Hello", previous_response_id=previous.id)


def test_a_response_sent_with_store_false_is_not_kept(served):
    client = sdk(served)
    response = client.responses.create(model=httpd.MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=httpd.MODEL, input="Hello", previous_response_id=response.id)


def test_max_output_tokens_makes_an_incomplete_response(served):
    options = {"model": httpd.MODEL, "input": "Tell me a long story.", "max_output_tokens": 3, "temperature": 0}
    response = sdk(served).responses.create(**options)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    events = list(sdk(served).responses.create(**options, stream=True))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text


@pytest.mark.parametrize("namespaced", [False, True], ids=["function", "namespace"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_round_trip_reuses_the_cache(tools_served, tools_reference, stream, namespaced):
    """As Codex sends them: function tools, some grouped in a namespace, and web search, which
    cannot run here and is dropped (said in a header)."""
    client = sdk(tools_served)
    tools = [{"type": "function", **t} for t in toolchat.TOOLS]
    if namespaced:
        tools = [{"type": "namespace", "name": "weather", "description": "Weather tools.", "tools": tools}]
    tools.append({"type": "web_search", "external_web_access": False})
    history = toolchat.history()
    items: list[dict] = []
    for m in history[1:]:
        if m.get("tool_calls"):
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": json.dumps(c["function"]["arguments"])} for c in m["tool_calls"]]
        elif m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        else:
            items.append({"role": m["role"], "content": m["content"]})
    items.append({"role": "user", "content": toolchat.QUESTION})
    options = {"instructions": history[0]["content"], "tools": tools,
               "user": f"responses-tools-{stream}-{namespaced}"}

    raw = client.responses.with_raw_response.create(model=httpd.MODEL, input=items, max_output_tokens=2, **options)
    assert raw.headers[TOOLS_DROPPED] == "web_search"
    called, _ = respond(client, stream=stream, input=items, max_output_tokens=40, **options)
    assert called.status == "completed"
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert call.namespace == ("weather" if namespaced else None)
    assert json.loads(call.arguments) == {"city": "Paris"}

    items += as_input(called.output) + [{"type": "function_call_output", "call_id": call.call_id,
                                         "output": toolchat.RESULT}]
    answered, _ = respond(client, stream=stream, input=items, max_output_tokens=16, **options)
    assert answered.output_text
    first = called.usage
    assert answered.usage.input_tokens_details.cached_tokens >= first.input_tokens + first.output_tokens - SLACK
    ours = history + [{"role": "user", "content": toolchat.QUESTION}, toolchat.call(call.call_id, "Paris"),
                      {"role": "tool", "tool_call_id": call.call_id, "content": toolchat.RESULT}]
    assert answered.output_text == text_of(tools_reference, ours, 16, tools=toolchat.TOOLS)


@pytest.mark.parametrize("body, status, words", [
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "text only"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, 400, "json_schema"),
    ({"input": "Hi", "tool_choice": "required"}, 400, "needs tools"),
    ({"input": "Hi", "previous_response_id": "resp_unknown"}, 404, "no response"),
    ({"input": "Hi", "model": "gpt-5"}, 404, "no model named 'gpt-5'"),
    ({}, 400, "input"),
])
def test_bad_requests_get_openai_errors(served, body, status, words):
    code, answer = served.request("POST", "/v1/responses", json.dumps({"model": httpd.MODEL, **body}).encode(),
                                  {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"})
    assert code == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]
