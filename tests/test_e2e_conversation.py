"""End to end on the real default model, over a real Unix socket, through the client library."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


from mlxkv import Client

MAX_TOKENS = 24
# Tokens a chat template adds around a message ("<|im_end|>\n<|im_start|>user\n" ...).
TEMPLATE_TOKENS = 12

SYSTEM = "You are a concise assistant. Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "And what river runs through it?",
    "Name one famous museum there.",
    "Which century was it founded in?",
]


def test_four_turn_conversation_prefills_only_the_delta(shared_daemon, reference):
    with Client(shared_daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        transcript = [{"role": "system", "content": SYSTEM}]
        previous = None
        for i, question in enumerate(QUESTIONS):
            turn = conv.send(question, max_tokens=MAX_TOKENS)
            transcript.append({"role": "user", "content": question})

            # Correctness: exactly what mlx-lm produces from the full prompt with no cache.
            assert turn.prompt_tokens == len(reference.prompt(transcript))
            assert turn.token_ids == reference.generate(transcript, MAX_TOKENS), f"turn {i + 1}"
            assert turn.completion_tokens >= len(turn.token_ids)
            assert turn.revision == i + 1
            assert not turn.resent

            if previous is not None:
                assert turn.cache_source == "conversation"
                history = previous.prompt_tokens + previous.completion_tokens
                assert turn.cached_tokens >= history - TEMPLATE_TOKENS
                new_message = len(reference.tokenizer.encode(question))
                assert new_message <= turn.prefill_tokens <= new_message + TEMPLATE_TOKENS
            else:
                # A first turn has no history of its own; it may share a system prompt.
                assert turn.cache_source in ("none", "shared_prefix")
            assert turn.prefill_tokens == turn.prompt_tokens - turn.cached_tokens
            assert turn.time_to_first_token_s > 0
            transcript.append({"role": "assistant", "content": turn.text})
            previous = turn
        assert conv.messages == transcript
        stored = client.get_conversation(conv.conversation_id)
        assert stored.revision == len(QUESTIONS)
        assert [m.content for m in stored.messages] == [m["content"] for m in transcript]


def test_daemon_restart_between_turns_is_transparent(make_daemon, reference):
    # No disk tier: the restarted daemon has lost everything and must be told the history.
    daemon = make_daemon("--max-disk-bytes", "0")
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send(QUESTIONS[0], max_tokens=MAX_TOKENS)
        assert first.revision == 1

        daemon.restart()

        second = conv.send(QUESTIONS[1], max_tokens=MAX_TOKENS)
        assert second.resent, "the client should have re-sent the history after the restart"
        transcript = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        assert second.token_ids == reference.generate(transcript, MAX_TOKENS)
        assert second.cache_source == "none"

        third = conv.send(QUESTIONS[2], max_tokens=MAX_TOKENS)
        transcript += [
            {"role": "assistant", "content": second.text},
            {"role": "user", "content": QUESTIONS[2]},
        ]
        assert not third.resent
        assert third.cache_source == "conversation"
        assert third.token_ids == reference.generate(transcript, MAX_TOKENS)


def test_sigterm_removes_the_socket_and_exits_zero(make_daemon):
    daemon = make_daemon()
    assert daemon.socket.exists()
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "stopped" in daemon.log()


def test_client_works_without_mlx(shared_daemon, tmp_path):
    """The base install (grpcio, protobuf, platformdirs and mlxkv) with no MLX anywhere."""
    import google.protobuf
    import grpc as grpc_pkg
    import platformdirs
    import typing_extensions

    import mlxkv

    site = tmp_path / "site"
    site.mkdir()
    (site / "google").mkdir()
    (site / "google" / "protobuf").symlink_to(Path(google.protobuf.__file__).parent)
    for module in (grpc_pkg, platformdirs, mlxkv):
        (site / module.__name__).symlink_to(Path(module.__file__).parent)
    # grpcio's own dependency, a single module.
    (site / "typing_extensions.py").symlink_to(typing_extensions.__file__)
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("mlx") is None, "mlx must not be importable here"
        from mlxkv import Client
        with Client({str(shared_daemon.socket)!r}) as client:
            turn = client.conversation().send("Say hello.", max_tokens=8)
            assert turn.completion_tokens > 0 and turn.revision == 1, turn
            print("OK", client.status().model)
        assert "mlx" not in sys.modules and "mlx_lm" not in sys.modules
        """
    )
    # -S: no site-packages at all; only the packages linked above are importable.
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK SmolLM2-135M-Instruct")
