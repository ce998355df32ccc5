"""Bad input gets a clear gRPC status and the daemon keeps serving."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(shared_daemon):
    with grpc.insecure_channel(f"unix://{shared_daemon.socket}") as channel:
        yield pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)


def user(text: str) -> pb.Message:
    return pb.Message(role="user", content=text)


def generate(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))


def assert_status(code: grpc.StatusCode, call, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()


def assert_still_serving(stub, health) -> None:
    reply = health.Check(health_pb2.HealthCheckRequest(service="mlxkv.v1.Inference"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    events = generate(stub, messages=[user("Hi")], max_tokens=2)
    assert events[0].HasField("start") and events[-1].HasField("done")


BAD_REQUESTS = [
    ("empty messages", dict(conversation_id="bad", reset=True), "messages must not be empty"),
    (
        "unknown role",
        dict(conversation_id="bad", reset=True, messages=[pb.Message(role="wizard", content="x")]),
        "role 'wizard'",
    ),
    ("negative max_tokens", dict(messages=[user("x")], max_tokens=-1), "max_tokens"),
    ("zero max_tokens", dict(messages=[user("x")], max_tokens=0), "max_tokens"),
    ("absurd max_tokens", dict(messages=[user("x")], max_tokens=10**9), "max_tokens"),
    (
        "negative temperature",
        dict(messages=[user("x")], sampling=pb.SamplingParams(temperature=-1)),
        "temperature",
    ),
    ("top_p zero", dict(messages=[user("x")], sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
    ("top_p above 1", dict(messages=[user("x")], sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    ("NUL in id", dict(conversation_id="a\x00b", reset=True, messages=[user("x")]), "control"),
    ("huge id", dict(conversation_id="x" * 10_000, reset=True, messages=[user("x")]), "longer"),
    (
        "bad tool schema",
        dict(messages=[user("x")], tools=[pb.Tool(name="t", parameters_json="{nope")]),
        "not JSON",
    ),
]


@pytest.mark.parametrize("name,fields,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_invalid_argument(stub, name, fields, fragment):
    inference, health = stub
    assert_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: generate(inference, **fields), fragment)
    assert_still_serving(inference, health)


def test_stale_base_revision_is_failed_precondition(stub):
    inference, health = stub
    events = generate(inference, conversation_id="stale", reset=True, messages=[user("Hi")], max_tokens=2)
    assert events[-1].done.revision == 1
    assert_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: generate(inference, conversation_id="stale", base_revision=7, messages=[user("Go on")]),
        "revision 1",
    )
    # The conversation is intact: a delta on the right revision works.
    events = generate(
        inference, conversation_id="stale", base_revision=1, messages=[user("Go on")], max_tokens=2
    )
    assert events[-1].done.revision == 2
    assert_still_serving(inference, health)


def test_unknown_conversation_delta_is_failed_precondition(stub):
    inference, _ = stub
    assert_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: generate(inference, conversation_id="never-seen", base_revision=3, messages=[user("x")]),
        "unknown conversation",
    )


def test_get_and_delete_unknown_conversation_is_not_found(stub):
    inference, health = stub
    assert_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: inference.GetConversation(pb.GetConversationRequest(conversation_id="nope"), timeout=10),
        "no conversation",
    )
    assert_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: inference.DeleteConversation(pb.DeleteConversationRequest(conversation_id="nope"), timeout=10),
        "no conversation",
    )
    assert_still_serving(inference, health)


def test_delete_then_get_is_not_found(stub):
    inference, _ = stub
    generate(inference, conversation_id="gone", reset=True, messages=[user("Hi")], max_tokens=2)
    assert inference.GetConversation(pb.GetConversationRequest(conversation_id="gone")).revision == 1
    inference.DeleteConversation(pb.DeleteConversationRequest(conversation_id="gone"), timeout=30)
    assert_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: inference.GetConversation(pb.GetConversationRequest(conversation_id="gone")),
        "no conversation",
    )


def test_prompt_over_context_window_is_resource_exhausted(stub):
    inference, health = stub
    huge = "word " * 9000  # ~9,000 tokens, over SmolLM2's 8,192-token window
    assert_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: generate(inference, messages=[user(huge)], max_tokens=4),
        "context window",
    )
    assert_still_serving(inference, health)
