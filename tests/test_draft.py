"""Speculative decoding with a draft model (``--draft-model``): exact tokens and cache on the
default model, the draft's own per-conversation caches, the vocabulary check, and a real
daemon's turns with it. The draft is the default model with layers skipped (``bench.drafts``):
no smaller model shares its tokenizer here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon
from test_speculative import EDIT, MAX_TOKENS, PROSE, cancel_stops_within_one_step, run

from mlxkv import Client



@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, model_dir) -> Path:
    from bench.drafts import layer_skip_draft

    return layer_skip_draft(model_dir, tmp_path_factory.mktemp("draft") / "skip-draft")


@pytest.fixture(scope="module")
def runtime(model_dir):
    from mlxkvd.runtime import ModelRuntime

    return ModelRuntime(model_dir)


@pytest.fixture
def draft(draft_dir):
    from mlxkvd.drafting import DraftModel
    from mlxkvd.runtime import ModelRuntime

    return DraftModel(ModelRuntime(draft_dir), max_bytes=1 << 30)


def drafting(draft, key: str = "c"):
    """A drafter factory for ``run``: ``draft``'s proposer for conversation ``key``."""
    return lambda ids: draft.proposer(key, ids, MAX_TOKENS)


@pytest.mark.parametrize("messages", [EDIT, PROSE], ids=["code-edit", "prose"])
def test_draft_model_gives_the_tokens_and_cache_of_plain_greedy_decoding(runtime, draft, messages):
    import mlx.core as mx

    ids, plain, plain_cache, _ = run(runtime, messages)
    _, fast, fast_cache, proposer = run(runtime, messages, drafting(draft))
    assert fast == plain
    assert proposer.drafted > 0 and proposer.accepted > 0, (proposer.drafted, proposer.accepted)
    assert fast_cache[0].offset == plain_cache[0].offset
    picks = [runtime.model(mx.array([[9]]), cache=c)[0, -1].argmax().item() for c in (plain_cache, fast_cache)]
    assert picks[0] == picks[1]


def test_the_draft_keeps_a_cache_per_conversation_for_its_next_turn(runtime, draft):
    ids, tokens, _, first = run(runtime, EDIT, drafting(draft, "kept"))
    assert first.reused == 0
    stored = draft.store.tokens_of("kept")
    # The draft saw the prompt and the reply but its last token (fed with the next draft).
    assert stored is not None and stored == (ids + tokens)[: len(stored)] and len(stored) > len(ids)
    follow_up = EDIT + [{"role": "assistant", "content": runtime.decode(tokens)},
                        {"role": "user", "content": "Now only the renamed function."}]
    _, again, _, second = run(runtime, follow_up, drafting(draft, "kept"))
    _, plain, _, _ = run(runtime, follow_up)
    assert again == plain
    assert second.reused >= len(ids), (second.reused, len(ids))  # no catch-up on the history


def test_a_caller_stopping_mid_draft_leaves_exactly_what_it_took_in_the_cache(runtime, draft):
    for stop_after in (1, 5, 17):
        ids, tokens, cache, _ = run(runtime, EDIT, drafting(draft, f"stop{stop_after}"), stop_after=stop_after)
        assert len(tokens) == stop_after and cache[0].offset == len(ids) + stop_after


def other_vocabulary(tmp: Path, model_dir: Path) -> Path:
    """A random-weight model whose tokenizer has one token more than the default model's."""
    from bench.models import TINY_2L, build_random_model

    out = build_random_model(tmp / "other-vocab", TINY_2L, model_dir)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]) + len(spec["added_tokens"]) + 7,
                                 "content": "<|not-in-smollm|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_a_draft_with_another_vocabulary_is_refused(runtime, tmp_path, model_dir):
    from mlxkvd.drafting import DraftModel
    from mlxkvd.runtime import ModelRuntime

    misfit = DraftModel(ModelRuntime(other_vocabulary(tmp_path, model_dir)), max_bytes=1 << 20).misfit(runtime)
    assert misfit is not None and "vocabularies" in misfit


def test_the_daemon_refuses_to_start_with_a_draft_that_cannot_draft_for_its_model(tmp_path, model_dir, cache_dir):
    from mlxkvd.daemon import EXIT_MODEL

    proc = subprocess.run(
        [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(tmp_path / "s.sock"), "--cache-dir",
         str(cache_dir), "--draft-model", str(other_vocabulary(tmp_path, model_dir))],
        env={**os.environ, "MLXKV_CONFIG": ""}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == EXIT_MODEL, proc.stderr
    assert "different vocabularies" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.sock").exists()


# -- a real daemon -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir, draft_dir):
    import tempfile

    d = Daemon(socket=Path(tempfile.mkdtemp(prefix="mlxkv-")) / "s.sock", cache_dir=cache_dir,
               log_path=tmp_path_factory.mktemp("log") / "daemon.log",
               extra_args=["--draft-model", str(draft_dir), "--speculative", "draft", "--max-disk-bytes", "0"]).start()
    yield d
    d.stop()


def test_a_drafted_turn_is_exact_counted_and_its_cache_serves_the_next_turn(daemon, reference):
    assert "draft model skip-draft loaded" in daemon.log()
    with Client(daemon.socket) as client:
        conv = client.conversation(system=EDIT[0]["content"], max_tokens=MAX_TOKENS)
        turn = conv.send(EDIT[1]["content"])
        assert turn.token_ids == reference.generate(EDIT, MAX_TOKENS)
        assert turn.drafted_tokens > 0 and turn.accepted_tokens > 0
        assert f"drafted={turn.drafted_tokens} accepted={turn.accepted_tokens}" in daemon.log()
        status = client.status()
        assert status.draft_model == "skip-draft" and status.tokens_drafted >= turn.drafted_tokens
        # The draft's caches take their share of the default 2 GiB budget.
        memory = next(t for t in status.cache_tiers if t.name == "memory")
        assert 1 << 30 < memory.budget_bytes < 2 << 30, memory.budget_bytes
        nxt = conv.send("Thanks. Now only the renamed function.")
        history = [dict(m) for m in conv.messages]
        assert nxt.cached_tokens >= turn.prompt_tokens + len(turn.token_ids) - 2
        assert nxt.token_ids == reference.generate(history[:-1], MAX_TOKENS) and nxt.drafted_tokens > 0
        # Per request: prompt lookup, or nothing, on the same daemon.
        looked_up = client.ask(PROSE[0]["content"], speculative="prompt-lookup", max_tokens=MAX_TOKENS)
        assert looked_up.token_ids == reference.generate(PROSE, MAX_TOKENS)
        assert client.ask(EDIT[1]["content"], speculative="off", max_tokens=8).drafted_tokens == 0


def test_cancelling_a_drafted_turn_stops_it_within_one_step(daemon, reference):
    cancel_stops_within_one_step(daemon, reference, "draft-cancel")


def test_draft_is_refused_by_a_daemon_without_a_draft_model(shared_daemon):
    with Client(shared_daemon.socket) as client:
        with pytest.raises(Exception, match="--draft-model"):
            client.ask("Hi", speculative="draft", max_tokens=2)
