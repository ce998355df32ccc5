"""A second turn of a busy conversation is refused without harming it. (Many clients at once,
with no cross-talk and no failed request: ``test_batching.py``.)"""

from __future__ import annotations

import threading

import grpc
import pytest

from mlxkv import Client
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

MAX_TOKENS = 8
SYSTEM = "You are a terse assistant. Reply with a few words."


def test_second_turn_of_a_busy_conversation_is_aborted_and_harmless(shared_daemon, reference):
    question = "Count from one to twenty in words."
    with Client(shared_daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send("Hi!", max_tokens=MAX_TOKENS)
        transcript = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": first.text},
        ]
        streaming = threading.Event()
        result: dict = {}

        def long_turn():
            try:
                result["turn"] = conv.send(question, max_tokens=40, on_text=lambda _t: streaming.set())
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        worker = threading.Thread(target=long_turn)
        worker.start()
        assert streaming.wait(300), "the first turn never streamed"
        # The same delta again, from another channel, while the first is mid-answer.
        with grpc.insecure_channel(f"unix://{shared_daemon.socket}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(
                conversation_id=conv.conversation_id,
                base_revision=first.revision,
                messages=[pb.Message(role="user", content="Something else")],
                max_tokens=4,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=60))
        assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
        assert "in flight" in info.value.details()
        worker.join(600)
        assert "error" not in result, result.get("error")
        transcript.append({"role": "user", "content": question})
        assert result["turn"].token_ids == reference.generate(transcript, 40)
        assert result["turn"].revision == first.revision + 1
        transcript.append({"role": "assistant", "content": result["turn"].text})
        # The refused request left no trace: the next turn builds on the cache and matches.
        after = conv.send("Thanks.", max_tokens=MAX_TOKENS)
        transcript.append({"role": "user", "content": "Thanks."})
        assert after.token_ids == reference.generate(transcript, MAX_TOKENS)
        assert after.cache_source == "conversation" and not after.resent
        stored = client.get_conversation(conv.conversation_id)
        assert stored.revision == first.revision + 2
        assert [m.content for m in stored.messages if m.role == "user"] == ["Hi!", question, "Thanks."]
