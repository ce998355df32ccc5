"""The turn in flight end to end: its cache counts against the memory budget while it runs, and
a long prefill stops at the next chunk when the client cancels, keeping what it prefilled."""

from __future__ import annotations

import re
import time

import grpc
import pytest
from conftest import tier, wait_for

from mlxkv import Client
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.model]

MAX_TOKENS = 8
SYSTEM = "You are a terse assistant. Reply with a few words."
# float32 KV of SmolLM2-135M: 30 layers x (K and V) x 3 heads x 64 dims x 4 bytes, allocated
# 256 tokens at a time; every conversation here stays under 256 tokens.
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
CONVERSATION_BYTES = 256 * KV_BYTES_PER_TOKEN
PREFILL_STEP = 512  # mlxkvd.runtime.PREFILL_STEP: a cancel is seen between chunks of this size


def test_the_turn_in_flight_counts_against_the_memory_budget(make_daemon, tmp_path):
    budget = 2 * CONVERSATION_BYTES + CONVERSATION_BYTES // 2  # room for two conversations
    daemon = make_daemon("--max-cache-bytes", str(budget), cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        for i in range(2):
            client.conversation(system=SYSTEM).send(f"Name a fruit starting with {'AB'[i]}.", max_tokens=MAX_TOKENS)
        memory = tier(client.status(), "memory")
        assert memory.entries == 2 and memory.in_flight_bytes == 0

        # A third conversation's turn: its cache is reserved before it grows, so one of the
        # two stored ones leaves memory for it.
        stream = client.conversation(system=SYSTEM).stream(
            "Count from 1 to 100, one number per line.", max_tokens=40
        )
        during = []
        for n, _ in enumerate(stream):
            if n in (1, 5):
                during.append(tier(client.status(), "memory"))
        stream.close()
        assert len(during) == 2, "the reply was too short to look at the turn in flight"
        for memory in during:
            assert memory.in_flight_bytes > 0
            assert memory.bytes + memory.in_flight_bytes <= budget

        after = wait_for(lambda: (m := tier(client.status(), "memory")).in_flight_bytes == 0 and m, 5)
        assert after.entries == 2  # the new conversation and one of the first two
        assert after.bytes <= budget


def cancelled_in_log(daemon, conversation_id: str) -> re.Match | None:
    return re.search(
        rf"turn conversation={conversation_id} cancelled: generated=(\d+), (\d+) after the cancel",
        daemon.log(),
    )


def test_a_cancel_stops_a_long_prefill_and_keeps_what_was_prefilled(make_daemon, reference, tmp_path):
    daemon = make_daemon(cache=tmp_path / "cache")
    facts = " ".join(f"Fact {i}: the box number {i} holds {i * 7 % 13} red marbles." for i in range(90))
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{facts}\nWhich box holds the most red marbles?"},
    ]
    prompt = reference.prompt(messages)
    # CPU prefill runs at tens of tokens/s here: three chunks take far longer than the cancel.
    assert 2 * PREFILL_STEP < len(prompt) < 4 * PREFILL_STEP
    conversation_id = "long-prefill-cancel"
    with Client(daemon.socket) as client, grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        call = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(
                conversation_id=conversation_id,
                messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages],
                reset=True,
                max_tokens=MAX_TOKENS,
            )
        )
        start = next(call)
        assert start.HasField("start") and start.start.prompt_tokens == len(prompt)
        assert start.start.cached_tokens == 0
        time.sleep(1.0)  # the prefill of the first chunk is under way
        call.cancel()

        # The engine sees the cancel after the chunk it is in, before any token. On this CPU
        # one chunk takes 10-20 s, the whole prefill several times that.
        match = wait_for(lambda: cancelled_in_log(daemon, conversation_id), timeout=60)
        assert match.group(1) == "0", "a token was generated after the cancel"
        wait_for(lambda: client.status().active_requests == 0, timeout=5)
        revisions = {c.conversation_id: c.revision for c in client.list_conversations()}
        assert revisions.get(conversation_id, 0) == 0  # nothing committed

        conv = client.conversation(conversation_id, system=SYSTEM)
        turn = conv.send(messages[1]["content"], max_tokens=MAX_TOKENS)
        assert turn.cache_source == "conversation", turn.cache_miss_reason
        # What was prefilled before the cancel, whole chunks of it, and not all of it.
        assert 0 < turn.cached_tokens < len(prompt) - 1
        assert turn.cached_tokens % PREFILL_STEP == 0
        assert turn.token_ids == reference.generate(messages, MAX_TOKENS)
