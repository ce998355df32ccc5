"""The client library through a real daemon's crash: a fresh client whose very first call is a
turn waits for the restarted daemon and gets the uninterrupted answer, as later calls do."""

from __future__ import annotations

import contextlib
import signal
import threading

from mlxkv import Client

MAX_TOKENS = 12
# About 700 tokens: its prefill takes long enough on the CPU for the kill to land inside it.
DOCUMENT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
QUESTION = DOCUMENT + "\n\nWhat animal jumps in the lines above? Answer in a few words."


class StartWatchingClient(Client):
    """A Client that signals when a turn's Start event has arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    def generate(self, request):
        with contextlib.closing(super().generate(request)) as events:
            for event in events:
                if event.WhichOneof("event") == "start":
                    self.started.set()
                yield event


def test_a_fresh_clients_first_turn_survives_a_sigkill_after_start(make_daemon, reference):
    daemon = make_daemon("--max-disk-bytes", "0")
    texts: list[str] = []
    result: dict[str, object] = {}
    with StartWatchingClient(daemon.socket, retry_unavailable_s=300) as client:
        conv = client.conversation()

        def turn() -> None:
            try:
                result["turn"] = conv.send(QUESTION, max_tokens=MAX_TOKENS, on_text=texts.append)
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        worker = threading.Thread(target=turn, daemon=True)
        worker.start()
        assert client.started.wait(300), "the turn never started"
        assert daemon.kill() == -signal.SIGKILL
        killed_mid_prefill = not texts
        daemon.start()  # same socket, same cache dir
        worker.join(300)
    assert not worker.is_alive(), "the turn never finished"
    assert "error" not in result, result.get("error")
    assert killed_mid_prefill
    messages = [{"role": "user", "content": QUESTION}]
    answer = result["turn"]
    assert answer.token_ids == reference.generate(messages, MAX_TOKENS)
    assert conv.messages == messages + [{"role": "assistant", "content": answer.text}]
    assert conv.revision == answer.revision > 0
    assert "Traceback" not in daemon.log()
