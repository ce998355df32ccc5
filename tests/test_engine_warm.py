"""Warm-ups in the engine, in process, on the tiny random-weight llama of
``test_engine_batch``: they run below turns, chunk by chunk, and leave the cache holding the
draft, whose next turn then prefills only what changed."""

from __future__ import annotations

import threading
import time

from mlxkvd.events import Warmed
from mlxkvd.runtime import PREFILL_STEP_CPU, Sampling
from test_engine_batch import harness, outcome, runtime  # noqa: F401, F811 - fixtures

DRAFT = "Summarise: " + " ".join(f"entry {i} of the list." for i in range(500))


def warm(h, key: str, content: str, revision: int):
    return h.turns.warm(key, [{"role": "user", "content": content}], [], reset=False, base_revision=revision)


def record_prefills(h, monkeypatch, committed: str) -> list[tuple[bool, threading.Event]]:
    """Every ``runtime.prefill`` call from now on: (whether conversation ``committed`` had a
    turn committed then, the caller's cancel event)."""
    calls: list[tuple[bool, threading.Event]] = []
    original = h.runtime.prefill

    def prefill(tokens, cache, cancelled=None):
        calls.append((h.registry.peek(committed) is not None, cancelled))
        return original(tokens, cache, cancelled)

    monkeypatch.setattr(h.runtime, "prefill", prefill)
    return calls


def test_a_turn_arriving_during_a_warm_up_runs_between_two_of_its_chunks(harness, monkeypatch):
    h = harness(max_batch=4)
    outcome(h.submit("drafting", "Hi."))
    calls = record_prefills(h, monkeypatch, committed="other")
    gate, holding = threading.Event(), threading.Event()
    h.engine.post(lambda: (holding.set(), gate.wait(30)))
    assert holding.wait(30)
    warming = warm(h, "drafting", DRAFT, 1)
    other: list = []
    original = h.runtime.prefill

    def prefill_then_arrive(tokens, cache, cancelled=None):
        fed = original(tokens, cache, cancelled)
        if cancelled is warming.cancelled and not other:
            other.append(h.submit("other", "Name a colour."))  # arrives during the first chunk
        return fed

    monkeypatch.setattr(h.runtime, "prefill", prefill_then_arrive)
    gate.set()
    while not other:
        time.sleep(0.001)
    outcome(other[0])
    warmed = warming.events.get(timeout=60)
    assert isinstance(warmed, Warmed) and not warmed.superseded
    assert warmed.cached_tokens + warmed.prefilled_tokens == warmed.prompt_tokens
    assert warmed.prefilled_tokens > 3 * PREFILL_STEP_CPU
    warm_chunks = [done for done, cancelled in calls if cancelled is warming.cancelled]
    assert len(warm_chunks) >= 4
    # The turn ran to its end after the warm-up's first chunk, before its second.
    assert warm_chunks == [False] + [True] * (len(warm_chunks) - 1)

    # The cache holds the draft: sending it prefills one token (fed again to sample from).
    turn = h.turns.submit("drafting", [{"role": "user", "content": DRAFT}], [], reset=False, base_revision=1,
                          sampling=Sampling(), max_tokens=4)
    started = outcome(turn)[0]
    assert started.prompt_tokens - started.cached_tokens == 1


def test_a_warm_up_waits_for_the_batch_to_empty(harness, monkeypatch):
    h = harness(max_batch=4)
    outcome(h.submit("batched-draft", "Hi."))
    calls = record_prefills(h, monkeypatch, committed="row-1")
    gate, holding = threading.Event(), threading.Event()
    h.engine.post(lambda: (holding.set(), gate.wait(30)))
    assert holding.wait(30)
    rows = [h.submit(f"row-{i}", "Tell me about rivers.", max_tokens=i * 16 + 8) for i in range(2)]
    warming = warm(h, "batched-draft", DRAFT, 1)
    gate.set()
    for row in rows:
        outcome(row)
    warmed = warming.events.get(timeout=60)
    assert isinstance(warmed, Warmed) and not warmed.superseded
    warm_chunks = [done for done, cancelled in calls if cancelled is warming.cancelled]
    assert warm_chunks and all(warm_chunks)  # every chunk after the longer row's end


def test_a_newer_warm_up_supersedes_the_queued_one(harness):
    h = harness(max_batch=4)
    outcome(h.submit("twice", "Hi."))
    gate, holding = threading.Event(), threading.Event()
    h.engine.post(lambda: (holding.set(), gate.wait(30)))
    assert holding.wait(30)
    first = warm(h, "twice", DRAFT, 1)
    second = warm(h, "twice", "Which is larger, 7 or 9?", 1)
    gate.set()
    assert h.turns.wait_warm(first).superseded
    done = h.turns.wait_warm(second)
    assert not done.superseded and done.cached_tokens + done.prefilled_tokens == done.prompt_tokens

