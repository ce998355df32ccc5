"""Per-turn work must not grow with the history (counts, not timings).

A 50-turn conversation with the real default model, through a real Unix socket, against the
daemon's pieces built in this process so that their work can be counted: each turn gives the
chat template only the first message and the new ones, tokenizes once, and only about what
the turn added; the cache store
never looks past the conversation's own entry; and every turn reuses everything the previous
one left in the cache (the reply re-renders into the ids that were generated).
"""

from __future__ import annotations


import pytest

from conftest import served_in_process, wait_for
from mlxkv import Client
from mlxkvd.idle import NEXT_TURN_ROOM
from mlxkvd.kvcache import MlxCacheOps

TURNS = 50


def has_room(store, key, tokens):
    where = store._entries.get(key)
    if where is None or where[0] != "memory":
        return False
    return MlxCacheOps().nbytes_with_room(where[1].cache, tokens) == where[1].nbytes


@pytest.fixture(scope="module")
def in_process(model_dir):
    from mlxkvd.runtime import ModelRuntime

    runtime = ModelRuntime(model_dir)
    with served_in_process(runtime) as (store, socket_path):
        yield runtime, store, socket_path


def test_a_fifty_turn_conversation_costs_each_turn_what_it_adds(in_process, reference):
    runtime, store, socket_path = in_process
    stats = runtime.renderer.stats
    searches = []  # the store's searches of other entries (its prefix index)
    longest = store._entries.longest

    def counting_longest(*args, **kwargs):
        searches.append(len(args[0]))
        return longest(*args, **kwargs)

    store._entries.longest = counting_longest
    try:
        with Client(socket_path, timeout=300) as client:
            chat = client.conversation("work", system="You answer in one short sentence.")
            held = 0  # tokens the conversation's cache holds after the previous turn
            for n in range(TURNS):
                before = dict(vars(stats))
                message = f"Fact {n}: name a color."
                turn = chat.send(message, max_tokens=3)
                done = {k: v - before[k] for k, v in vars(stats).items()}
                if n:
                    # The template renders each message on its own: the first message alone
                    # (with and without the generation prompt), then with the reply and the new
                    # message; never the history.
                    assert done["renders"] == 3, (n, done)
                    assert done["rendered_messages"] == 1 + 1 + 3, (n, done)
                assert done["tokenize_calls"] == 1, (n, done)
                # What the turn added: the last reply, the new message, and the markup.
                assert done["tokenized_chars"] <= len(message) + 3 * 32 + 128, (n, done)
                if n:
                    assert done["full_tokenizations"] == 0, (n, done)
                    assert turn.cached_tokens == held, (n, turn.cached_tokens, held)
                held = turn.prompt_tokens + turn.completion_tokens
                # Idle after the turn, the engine gives its cache room for the next one, so
                # that the next prefill writes in place instead of copying the history.
                wait_for(lambda: has_room(store, "work", NEXT_TURN_ROOM), timeout=10, interval=0.01)
    finally:
        store._entries.longest = longest
    # Only the first turn, which has no entry of its own yet, searched the others.
    assert len(searches) == 1, searches
    # The last turn's prompt is long and its reply still equals mlx-lm from the full prompt.
    assert turn.prompt_tokens > 20 * 15
    assert reference.generate(chat.messages[:-1], max_tokens=3) == list(turn.token_ids)


def test_a_huge_request_is_refused_without_rendering_or_tokenizing(in_process):
    """A 15 MiB message (under the 16 MiB cap) cannot fit the context: refused from the
    length of its text, with no render and no tokenizer call, on the handler thread."""
    import grpc

    runtime, _, socket_path = in_process
    stats = runtime.renderer.stats
    before = dict(vars(stats))
    with Client(socket_path, timeout=120) as client:
        with pytest.raises(Exception) as info:
            client.ask("x" * (15 << 20), max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "context window" in str(info.value)
        assert dict(vars(stats)) == before
        assert client.ask("Say hi.", max_tokens=2).completion_tokens >= 1
