"""Idle unload end to end: after ``idle_unload_s`` without a turn the weights and the resident
caches leave memory (caches to the disk tier), and the next turn loads them back, reuses the
history from disk and answers exactly as mlx-lm does with no cache. SIGHUP changes the delay."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import tier, wait_for

from mlxkv import Client

pytestmark = [pytest.mark.model]

MAX_TOKENS = 8
SYSTEM = "You are a terse assistant. Reply with a few words."
# The float32 weights of SmolLM2-135M are ~540 MB; about 370 MiB of RSS is measured to go away
# on unload (allocator slack keeps some). A clear margin below that, far above noise.
MIN_RSS_DROP = 200 * 1024**2


def history_of(turn) -> int:
    return turn.prompt_tokens + turn.completion_tokens


def unloaded_status(client: Client):
    """The status once the model is unloaded and the memory tier emptied, else None. Both:
    ``model_loaded`` is read live while the tier counts are a snapshot the engine refreshes
    after unloading, so for a moment the first can be False and the second stale."""
    status = client.status()
    return status if not status.model_loaded and tier(status, "memory").entries == 0 else None


def assert_stays_loaded(client: Client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert client.status().model_loaded, "the model was unloaded"
        time.sleep(0.5)


def assert_next_turn_reloads_from_disk(client, conv, first, reference):
    """The next turn loads the model again and reuses the whole history from the disk tier,
    with the no-cache reference's output."""
    second = conv.send("Name another one.", max_tokens=MAX_TOKENS)
    # At once: the reference below may take longer than a short unload delay on a busy machine.
    assert client.status().model_loaded
    assert second.cache_source == "disk", second.cache_miss_reason
    assert second.cached_tokens == history_of(first)
    assert second.token_ids == reference.generate(conv.messages[:-1], MAX_TOKENS)


def test_idle_daemon_unloads_and_the_next_turn_reloads_from_disk(make_daemon, reference, tmp_path):
    daemon = make_daemon("--idle-unload-s", "3", cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send("Name a fruit.", max_tokens=MAX_TOKENS)
        loaded = client.status()
        assert loaded.model_loaded
        assert tier(loaded, "memory").entries == 1

        unloaded = wait_for(lambda: unloaded_status(client), timeout=15)
        assert tier(unloaded, "memory").entries == 0
        assert tier(unloaded, "memory").bytes == 0
        assert tier(unloaded, "disk").entries == 1
        assert client.get_conversation(conv.conversation_id).cache_tier == "disk"
        drop = loaded.rss_bytes - unloaded.rss_bytes
        assert drop > MIN_RSS_DROP, f"RSS went from {loaded.rss_bytes} to {unloaded.rss_bytes}"
        assert "unloaded, 1 caches moved to disk" in daemon.log()

        assert_next_turn_reloads_from_disk(client, conv, first, reference)


def test_default_never_unloads(shared_daemon):
    with Client(shared_daemon.socket) as client:
        client.conversation(system=SYSTEM).send("Hello", max_tokens=2)
        # Past the write-behind delay and any small unload delay.
        assert_stays_loaded(client, seconds=6)
        assert "model unloaded" not in shared_daemon.log()


def test_sighup_turns_idle_unload_on(make_daemon, reference, tmp_path):
    config = tmp_path / "mlxkvd.toml"
    config.write_text("idle_unload_s = 0\n")
    daemon = make_daemon("--config", str(config), cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send("Name a color.", max_tokens=MAX_TOKENS)
        assert_stays_loaded(client, seconds=6)

        config.write_text("idle_unload_s = 2\n")
        daemon.proc.send_signal(signal.SIGHUP)
        # The turn ended more than 2 s ago: the new delay has already run out.
        unloaded = wait_for(lambda: unloaded_status(client), timeout=15)
        assert tier(unloaded, "memory").entries == 0
        assert "config reloaded: idle_unload_s 0.0 -> 2.0" in daemon.log()

        assert_next_turn_reloads_from_disk(client, conv, first, reference)
