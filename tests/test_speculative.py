"""Prompt-lookup speculative decoding: the drafting rules, the exact tokens and cache of a
speculative generation on the default model, and a real daemon's turns with it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from conftest import wait_for
from test_cancellation import wait_cancelled

from mlxkvd import speculative
from mlxkvd.speculative import MISSES_TO_PAUSE, PAUSE_START, PromptLookup

from mlxkv import Client

CODE = "\n".join((Path(__file__).resolve().parents[1] / "server/mlxkvd/params.py").read_text().splitlines()[:45])
EDIT = [
    {"role": "system", "content": "You are a coding assistant. Answer with code only."},
    {"role": "user", "content": f"Here is a file:\n```python\n{CODE}\n```\n"
                                "Rewrite the whole file with the function `sampling` renamed to `make_sampling`."},
]
PROSE = [{"role": "user", "content": "Why is the sky blue? Explain in a few sentences."}]
MAX_TOKENS = 64


# -- drafting --------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = PromptLookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3], room=8)
    assert lookup.propose(4) == [7, 8, 5, 2]  # "2 3" last occurred before 7 8 5 2 3
    lookup.append([7])
    assert lookup.propose(2) == [8, 5]  # "2 3 7" (three tokens) beats any pair
    assert PromptLookup([1, 2, 3, 4], room=4).propose(4) == []  # nothing repeats


def test_lookup_adapts_and_pauses_after_misses():
    lookup = PromptLookup([5, 6] * 20, room=64)
    k = lookup.k
    lookup.record(k, k)
    assert lookup.k == 2 * k  # a whole draft accepted: longer drafts
    lookup.record(lookup.k, 1)
    assert lookup.k == 2  # shrinks to what was accepted, plus one
    for _ in range(MISSES_TO_PAUSE):
        lookup.record(2, 0)
    assert [lookup.propose(8) for _ in range(PAUSE_START)] == [[]] * PAUSE_START  # paused
    assert lookup.propose(8) != []
    assert (lookup.drafted, lookup.accepted) == (3 * k + 2 * MISSES_TO_PAUSE, k + 1)


# -- generation on the default model, in process ----------------------------------------------


@pytest.fixture(scope="module")
def runtime(model_dir):
    from mlxkvd.runtime import ModelRuntime

    return ModelRuntime(model_dir)


def lookup(ids: list[int]) -> PromptLookup:
    return PromptLookup(ids, room=MAX_TOKENS)


def run(runtime, messages, drafter=None, *, stop_after: int | None = None):
    """Greedy tokens (end of turn excluded), the cache and the drafter: generated plainly, or
    speculatively with ``drafter(prompt ids)``."""
    from mlxkvd.runtime import Sampling

    ids = runtime.renderer.render(messages, []).ids
    cache = runtime.make_cache()
    runtime.prefill(ids[:-1], cache)
    sampler = runtime.sampler(Sampling())
    drafts = drafter(ids) if drafter is not None else None
    gen = (speculative.generate(runtime, ids[-1:], cache, drafts, max_tokens=MAX_TOKENS, sampler=sampler)
           if drafts is not None else runtime.generate(ids[-1:], cache, max_tokens=MAX_TOKENS, sampler=sampler))
    tokens = []
    with contextlib.closing(gen):
        for token in gen:
            if token in runtime.eos_token_ids:
                break
            tokens.append(token)
            if len(tokens) == stop_after:
                break
    return ids, tokens, cache, drafts


@pytest.mark.parametrize("messages", [EDIT, PROSE], ids=["code-edit", "prose"])
def test_lookup_gives_the_tokens_and_cache_of_plain_greedy_decoding(runtime, messages):
    ids, plain, plain_cache, _ = run(runtime, messages)
    _, fast, fast_cache, drafts = run(runtime, messages, lookup)
    assert fast == plain
    assert fast_cache[0].offset == plain_cache[0].offset
    if messages is EDIT:
        assert drafts.accepted > len(plain) // 3, (drafts.drafted, drafts.accepted)  # it copies
    # The caches hold the same tokens: the next step picks the same token.
    import mlx.core as mx

    picks = [runtime.model(mx.array([[9]]), cache=c)[0, -1].argmax().item() for c in (plain_cache, fast_cache)]
    assert picks[0] == picks[1]


def test_a_caller_stopping_mid_draft_leaves_exactly_what_it_took_in_the_cache(runtime):
    ids, _, _, _ = run(runtime, EDIT)
    for stop_after in (1, 7, 20):
        _, tokens, cache, _ = run(runtime, EDIT, lookup, stop_after=stop_after)
        assert len(tokens) == stop_after and cache[0].offset == len(ids) + stop_after


# -- a real daemon -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    import tempfile

    from conftest import Daemon

    d = Daemon(socket=Path(tempfile.mkdtemp(prefix="mlxkv-")) / "s.sock", cache_dir=cache_dir,
               log_path=tmp_path_factory.mktemp("log") / "daemon.log",
               extra_args=["--speculative", "prompt-lookup", "--max-disk-bytes", "0"]).start()
    yield d
    d.stop()


def test_a_speculative_turn_is_exact_counted_and_its_cache_serves_the_next_turn(daemon, reference):
    with Client(daemon.socket) as client:
        conv = client.conversation(system=EDIT[0]["content"], max_tokens=MAX_TOKENS)
        turn = conv.send(EDIT[1]["content"])
        assert turn.token_ids == reference.generate(EDIT, MAX_TOKENS)
        assert turn.drafted_tokens > 0 and turn.accepted_tokens > 0
        status = client.status()
        assert status.tokens_drafted >= turn.drafted_tokens and status.tokens_accepted >= turn.accepted_tokens
        assert f"drafted={turn.drafted_tokens} accepted={turn.accepted_tokens}" in daemon.log()
        nxt = conv.send("Thanks. Now only the renamed function.", speculative="off")
        history = [dict(m) for m in conv.messages]
        assert nxt.cached_tokens >= turn.prompt_tokens + len(turn.token_ids) - 2
        assert nxt.token_ids == reference.generate(history[:-1], MAX_TOKENS) and nxt.drafted_tokens == 0


def test_sampled_turns_and_requests_that_say_off_do_not_speculate(daemon):
    with Client(daemon.socket) as client:
        assert client.ask(EDIT[1]["content"], temperature=0.7, seed=1, max_tokens=8).drafted_tokens == 0
        assert client.ask(EDIT[1]["content"], speculative="off", max_tokens=8).drafted_tokens == 0
        with pytest.raises(Exception, match="draft"):
            client.ask("Hi", speculative="draft", max_tokens=2)


def test_cancelling_a_speculative_turn_stops_it_within_one_step(daemon, reference):
    cancel_stops_within_one_step(daemon, reference, "spec-cancel")


def cancel_stops_within_one_step(daemon, reference, conversation_id: str) -> None:
    """Cancel a speculative code-edit turn after 10 deltas: at most one verified step more is
    generated, and the conversation's next turn is exact."""
    from mlxkvd.speculative import DRAFT_MAX

    with Client(daemon.socket) as client:
        conv = client.conversation(conversation_id, system=EDIT[0]["content"], max_tokens=400)
        stream = conv.stream(EDIT[1]["content"])
        received = 0
        for _ in stream:
            received += 1
            if received == 10:
                break
        stream.close()
        generated, after_cancel = wait_cancelled(daemon, conversation_id)
        assert after_cancel <= DRAFT_MAX + 1, after_cancel  # one verified step at most
        assert received <= generated < 400
        wait_for(lambda: client.status().active_requests == 0)
        question = "Rename `sampling` to `build_sampling`."
        again = conv.send(question, max_tokens=8)
        assert again.token_ids == reference.generate([EDIT[0], {"role": "user", "content": question}], 8)
