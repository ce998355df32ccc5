"""A turn whose client goes away stops within one decode step, commits nothing, and the
conversation goes on as if the turn had never been asked (issue #6, part 2)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import grpc

from mlxkv import Client, Conversation
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

MAX_TOKENS = 8
LONG = 200  # far more than is read before the cancel
SYSTEM = "You are a terse assistant. Reply with a few words."
LONG_QUESTION = "Count from 1 to 100, one number per line."
CANCELLED = re.compile(
    r"turn conversation=(?P<id>\S+) cancelled: generated=(?P<n>\d+), (?P<after>\d+) after the cancel"
)


def wait_cancelled(daemon, conversation_id: str, timeout: float = 120.0) -> tuple[int, int]:
    """(tokens generated, tokens generated after the cancel) from the engine's log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in CANCELLED.finditer(daemon.log()):
            if m["id"] == conversation_id:
                return int(m["n"]), int(m["after"])
        time.sleep(0.1)
    raise AssertionError(f"no cancel logged for {conversation_id}")


def started(client: Client, conversation_id: str) -> tuple[Conversation, list[dict]]:
    """A conversation with one committed turn, and its transcript."""
    conv = client.conversation(conversation_id, system=SYSTEM)
    turn = conv.send("Hello!", max_tokens=MAX_TOKENS)
    assert turn.revision == 1
    return conv, [dict(m) for m in conv.messages]


def assert_not_committed(client: Client, conv: Conversation, transcript: list[dict]) -> None:
    stored = client.get_conversation(conv.conversation_id)
    assert stored.revision == 1
    assert [(m.role, m.content) for m in stored.messages] == [
        (m["role"], m["content"]) for m in transcript
    ], "the cancelled question or its partial answer was stored"


def assert_next_turn_matches(conv: Conversation, transcript: list[dict], reference) -> None:
    """The next turn, sent at once: not refused, consistent with a history without the
    cancelled turn, and built on the cache."""
    turn = conv.send("Name a color.", max_tokens=MAX_TOKENS)
    expected = reference.generate(transcript + [{"role": "user", "content": "Name a color."}], MAX_TOKENS)
    assert turn.token_ids == expected
    assert turn.revision == 2 and not turn.resent
    assert turn.cached_tokens > 0


def test_closing_the_stream_stops_the_turn(shared_daemon, reference):
    with Client(shared_daemon.socket) as client:
        conv, transcript = started(client, "cancel-close")
        before = client.status().tokens_generated
        received = 0
        stream = conv.stream(LONG_QUESTION, max_tokens=LONG)
        for _ in stream:
            received += 1
            if received == 3:
                break
        stream.close()
        generated, after_cancel = wait_cancelled(shared_daemon, conv.conversation_id)
        assert after_cancel <= 2, f"{after_cancel} tokens generated after the cancel"
        assert received <= generated < LONG
        # Cancelled tokens are counted as generated work.
        assert client.status().tokens_generated - before == generated
        assert conv.revision == 1 and conv.messages == transcript
        assert_not_committed(client, conv, transcript)
        assert_next_turn_matches(conv, transcript, reference)


def test_call_cancel_stops_the_turn(shared_daemon, reference):
    with Client(shared_daemon.socket) as client:
        conv, transcript = started(client, "cancel-call")
        with grpc.insecure_channel(f"unix://{shared_daemon.socket}") as channel:
            call = pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(
                    conversation_id=conv.conversation_id,
                    base_revision=1,
                    messages=[pb.Message(role="user", content=LONG_QUESTION)],
                    max_tokens=LONG,
                )
            )
            deltas = 0
            for event in call:
                deltas += event.HasField("delta")
                if deltas == 2:
                    call.cancel()
                    break
            assert call.code() == grpc.StatusCode.CANCELLED
        generated, after_cancel = wait_cancelled(shared_daemon, conv.conversation_id)
        assert after_cancel <= 2, f"{after_cancel} tokens generated after the cancel"
        assert generated < LONG
        assert_not_committed(client, conv, transcript)
        assert_next_turn_matches(conv, transcript, reference)


# A client process that streams a long answer, printing a line per delta, until it is killed.
STREAMER = r"""
import sys
from mlxkv import Client, Conversation
socket_path, conversation_id, system, hello, answer, question = sys.argv[1:7]
with Client(socket_path) as client:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": hello},
                {"role": "assistant", "content": answer}]
    conv = Conversation(client, conversation_id, messages=messages, revision=1)
    for text in conv.stream(question, max_tokens=200):
        print("delta", flush=True)
"""


def test_killed_client_process_stops_the_turn(shared_daemon, reference):
    with Client(shared_daemon.socket) as client:
        conv, transcript = started(client, "cancel-kill")
        proc = subprocess.Popen(
            [sys.executable, "-c", STREAMER, str(shared_daemon.socket), conv.conversation_id,
             SYSTEM, transcript[1]["content"], transcript[2]["content"], LONG_QUESTION],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(3):
                assert proc.stdout.readline() == "delta\n", "the client process did not stream"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        generated, after_cancel = wait_cancelled(shared_daemon, conv.conversation_id)
        assert after_cancel <= 2, f"{after_cancel} tokens generated after the disconnect"
        assert generated < LONG
        assert_not_committed(client, conv, transcript)
        assert_next_turn_matches(conv, transcript, reference)
