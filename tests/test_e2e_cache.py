"""The cache store end to end: budgets, the disk tier, restarts, shared prefixes, divergence."""

from __future__ import annotations


import pytest
from conftest import tier, wait_for

from mlxkv import Client, Conversation

MAX_TOKENS = 8
TEMPLATE_TOKENS = 12
SYSTEM = "You are a terse assistant. Reply with a few words."
# float32 KV of SmolLM2-135M: 30 layers x (K and V) x 3 heads x 64 dims x 4 bytes.
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
# mlx-lm grows KV buffers 256 tokens at a time; these conversations stay under 256 tokens.
CONVERSATION_BYTES = 256 * KV_BYTES_PER_TOKEN


def history_of(turn) -> int:
    return turn.prompt_tokens + turn.completion_tokens


def test_twenty_conversations_with_room_for_three(make_daemon, reference, tmp_path):
    budget = 3 * CONVERSATION_BYTES
    daemon = make_daemon("--max-cache-bytes", str(budget), cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conversations = [client.conversation(system=SYSTEM) for _ in range(20)]
        transcripts = [[{"role": "system", "content": SYSTEM}] for _ in range(20)]
        last = [None] * 20
        for round_ in range(2):
            for i, conv in enumerate(conversations):
                question = f"Round {round_}: what is {i} plus {round_ + 1}?"
                turn = conv.send(question, max_tokens=MAX_TOKENS)
                transcripts[i].append({"role": "user", "content": question})
                assert turn.token_ids == reference.generate(transcripts[i], MAX_TOKENS), (round_, i)
                transcripts[i].append({"role": "assistant", "content": turn.text})
                if round_ > 0:
                    # 17 of the 20 were pushed out of memory since their last turn: disk.
                    assert turn.cache_source in ("conversation", "disk"), turn.cache_miss_reason
                    assert turn.cached_tokens >= history_of(last[i]) - TEMPLATE_TOKENS
                else:
                    assert turn.cache_source in ("none", "shared_prefix")
                last[i] = turn
                status = client.status()
                assert tier(status, "memory").bytes <= budget
        status = client.status()
        memory, disk = tier(status, "memory"), tier(status, "disk")
        assert memory.entries <= 3
        assert disk.hits >= 17, "evicted conversations should have come back from disk"
        assert status.tokens_saved > 0


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_restart_resumes_from_disk(make_daemon, reference, tmp_path, signal_name):
    import signal

    daemon = make_daemon(cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        convs = [client.conversation(system=SYSTEM) for _ in range(3)]
        firsts = [
            c.send(f"Name a color that starts with {letter}.", max_tokens=MAX_TOKENS)
            for c, letter in zip(convs, "BGR")
        ]
        # Caches are written behind, while the daemon is idle; the signal comes after that.
        wait_for(lambda: tier(client.status(), "disk").entries >= 3)

        daemon.restart(getattr(signal, signal_name))

        for conv, first in zip(convs, firsts):
            turn = conv.send("And another one?", max_tokens=MAX_TOKENS)
            assert turn.resent  # the new daemon process did not know the conversation
            assert turn.cache_source == "disk", turn.cache_miss_reason
            assert turn.cached_tokens >= history_of(first) - TEMPLATE_TOKENS
            assert turn.token_ids == reference.generate(conv.messages[:-1], MAX_TOKENS)


def test_new_conversation_starts_from_a_shared_system_prompt(shared_daemon, reference):
    system = "You are a code assistant. " + " ".join(f"Rule {i}: be precise." for i in range(40))
    with Client(shared_daemon.socket) as client:
        first = client.conversation(system=system).send("Hello", max_tokens=MAX_TOKENS)
        second_conv = client.conversation(system=system)
        second = second_conv.send("Hi there", max_tokens=MAX_TOKENS)
        system_tokens = len(reference.tokenizer.encode(system))
        assert second.cache_source == "shared_prefix"
        assert second.cached_tokens >= system_tokens
        assert second.token_ids == reference.generate(second_conv.messages[:-1], MAX_TOKENS)
        assert first.cache_source in ("none", "shared_prefix")
        assert client.status().tokens_saved >= system_tokens


def test_edit_trims_to_the_common_prefix_and_says_why(shared_daemon, reference):
    from mlxkvd.store import common_prefix_length

    with Client(shared_daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        conv.send("What is two plus two?", max_tokens=MAX_TOKENS)
        conv.send("And three plus three?", max_tokens=MAX_TOKENS)
        stored_prompt = reference.prompt(conv.messages[:-1])
        # Edit the first question: everything from there on must be recomputed.
        edited = [dict(m) for m in conv.messages[:3]]
        edited[1]["content"] = "What is five plus five?"
        conv.reset(edited)
        turn = conv.send("And six plus six?", max_tokens=MAX_TOKENS)
        new_prompt = reference.prompt(conv.messages[:-1])
        assert turn.cache_source == "conversation"
        assert turn.cached_tokens == common_prefix_length(stored_prompt, new_prompt)
        assert turn.cached_tokens >= len(reference.tokenizer.encode(SYSTEM))
        assert "diverged at token" in turn.cache_miss_reason
        assert "message 1" in turn.cache_miss_reason
        assert turn.token_ids == reference.generate(conv.messages[:-1], MAX_TOKENS)


def test_regenerate_reuses_the_prompt_and_matches_reference(shared_daemon, reference):
    with Client(shared_daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send("Name a fruit.", max_tokens=MAX_TOKENS)
        again = conv.regenerate(max_tokens=MAX_TOKENS)
        assert again.token_ids == first.token_ids  # greedy: the same answer
        assert again.cached_tokens == first.prompt_tokens - 1
        assert again.token_ids == reference.generate(conv.messages[:-1], MAX_TOKENS)


def test_delete_removes_both_tiers(make_daemon, tmp_path):
    daemon = make_daemon(cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        conv.send("Hello", max_tokens=MAX_TOKENS)
        wait_for(lambda: tier(client.status(), "disk").entries >= 1)
        client.delete_conversation(conv.conversation_id)
        status = wait_for(lambda: (s := client.status()) and tier(s, "disk").entries == 0 and s)
        assert tier(status, "memory").entries == 0
        assert not list((tmp_path / "cache" / "kv").glob("*.safetensors"))


def test_another_models_disk_entries_are_kept_and_not_served(make_daemon, tmp_path):
    cache = tmp_path / "cache"
    daemon = make_daemon(cache=cache)
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        conv.send("Hello", max_tokens=MAX_TOKENS)
        wait_for(lambda: tier(client.status(), "disk").entries >= 1)
    daemon.stop()
    files = sorted((cache / "kv").glob("*.safetensors"))
    # 8-bit KV caches are a different cache format: the fingerprint differs.
    other = make_daemon("--kv-bits", "8", cache=cache)
    with Client(other.socket) as client:
        assert tier(client.status(), "disk").entries == 0
        assert tier(client.status(), "disk").bytes >= sum(f.stat().st_size for f in files)
        conv = Conversation.from_dict(client, conv.to_dict())
        turn = conv.send("Again", max_tokens=MAX_TOKENS)
        assert turn.cache_source == "none"
    assert set(files) <= set((cache / "kv").glob("*.safetensors"))  # kept for their model


def test_quantized_kv_reuses_and_uses_fewer_bytes(make_daemon, tmp_path):
    sizes = {}
    for bits in ("0", "8", "4"):
        daemon = make_daemon("--kv-bits", bits, "--max-disk-bytes", "0", cache=tmp_path / f"c{bits}")
        with Client(daemon.socket) as client:
            conv = client.conversation(system=SYSTEM)
            conv.send("Count from one to five.", max_tokens=MAX_TOKENS)
            second = conv.send("Now backwards.", max_tokens=MAX_TOKENS)
            assert second.cache_source == "conversation"
            assert second.cached_tokens > second.prefill_tokens
            sizes[bits] = tier(client.status(), "memory").bytes
        daemon.stop()
    assert sizes["8"] < sizes["0"] / 2
    assert sizes["4"] < sizes["8"]
