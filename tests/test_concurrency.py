"""Many clients at once on one daemon: no cross-talk between conversations, no failed request,
and a second turn of a busy conversation is refused without harming it (issue #6, part 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from mlxkv import Client
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

CLIENTS = 8
TURNS = 3
MAX_TOKENS = 8
SYSTEM = "You are a terse assistant. Reply with a few words."
TOPICS = ["cats", "rivers", "bread", "trains", "snow", "copper", "violins", "tea"]

# One client process: waits for the go-file so that all of them start together, holds its own
# conversation for TURNS turns and prints one JSON line per turn (or the error).
WORKER = r"""
import json, os, sys, time
from mlxkv import Client
socket_path, go, topic, turns, max_tokens, system = sys.argv[1:7]
while not os.path.exists(go):
    time.sleep(0.01)
questions = [f"Say one thing about {topic}.", f"Another fact about {topic}?", f"Is {topic} a word?"]
with Client(socket_path, retry_unavailable_s=0) as client:
    conv = client.conversation(system=system)
    for i in range(int(turns)):
        started = time.perf_counter()
        try:
            turn = conv.send(questions[i % len(questions)], max_tokens=int(max_tokens))
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            sys.exit(1)
        print(json.dumps({
            "question": questions[i % len(questions)], "text": turn.text, "token_ids": turn.token_ids,
            "revision": turn.revision, "resent": turn.resent, "wall_s": time.perf_counter() - started,
            "ttft_s": turn.time_to_first_token_s, "completion_tokens": turn.completion_tokens,
        }), flush=True)
"""


def run_clients(socket_path: Path, tmp_path: Path, n: int, turns: int, max_tokens: int) -> list[list[dict]]:
    """Start ``n`` client processes, release them together, return each one's turns."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(socket_path), str(go), TOPICS[i % len(TOPICS)],
             str(turns), str(max_tokens), SYSTEM],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    time.sleep(1.0)  # let them import grpc and reach the barrier
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert proc.returncode == 0, (lines, err[-2000:])
        results.append(lines)
    return results


def test_eight_client_processes_get_their_own_greedy_answers(shared_daemon, reference, tmp_path):
    results = run_clients(shared_daemon.socket, tmp_path, CLIENTS, TURNS, MAX_TOKENS)
    assert len(results) == CLIENTS
    for client, turns in enumerate(results):
        assert len(turns) == TURNS and not any("error" in t for t in turns), turns
        transcript = [{"role": "system", "content": SYSTEM}]
        for i, turn in enumerate(turns):
            transcript.append({"role": "user", "content": turn["question"]})
            expected = reference.generate(transcript, MAX_TOKENS)
            assert turn["token_ids"] == expected, (client, i, turn["text"])
            assert turn["revision"] == i + 1 and not turn["resent"]
            transcript.append({"role": "assistant", "content": turn["text"]})
    # The load really overlapped: the daemon counted every turn, none failed.
    with Client(shared_daemon.socket) as client:
        status = client.status()
    assert status.requests >= CLIENTS * TURNS
    assert status.requests_failed == 0


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
