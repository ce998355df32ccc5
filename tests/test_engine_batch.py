"""The engine's batch mode, in process, on a tiny random-weight llama (the default model's
tokenizer and chat template): no socket, no daemon, turns submitted through ``turns.Turns``.

A lone turn runs serially and equals mlx-lm; turns queued together become rows of one batch,
leave it with their caches checked in holding exactly their prompt and reply (the same K/V a
fresh prefill of those tokens computes), and the next turn of each conversation reuses all of
it. ``max_batch=1`` never batches.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mlxkvd.catalog import Catalog
from mlxkvd.conversations import ConversationRegistry
from mlxkvd.engine import Engine
from mlxkvd.errors import ConversationNotFoundError
from mlxkvd.events import Failed, Finished, Started, Text
from mlxkvd.kvcache import MlxCacheOps
from mlxkvd.models import ModelHost
from mlxkvd.prefix_index import common_prefix_length
from mlxkvd.runtime import ModelRuntime, Sampling
from mlxkvd.store import CacheStore
from mlxkvd.turns import Turns

# Two layers, grouped-query attention (4 query heads on 2 KV heads): batched attention with
# a padding mask has something to get wrong; still milliseconds per step on the CPU.
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128)
MAX_TOKENS = 12
ROWS = 4
SYSTEM = "You are a terse assistant."
# Prompts of different lengths: the batch left-pads the shorter rows.
QUESTIONS = ["Hi.", "Name three rivers of Europe, please.", "What is a cache?",
             "Tell me, in one line, why the sky looks blue on a clear afternoon in summer."]
EVENT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, model_dir) -> ModelRuntime:
    from bench.models import LlamaShape, build_random_model

    path = build_random_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", LlamaShape(**SHAPE), model_dir)
    return ModelRuntime(path)


def host_for(engine: Engine) -> ModelHost:
    """A model host serving the engine's runtime alone (an empty catalogue but the default)."""
    empty = Path(tempfile.mkdtemp(prefix="mlxkv-catalog-"))
    return ModelHost.for_engine(engine, Catalog(cache_dir=empty, hf_cache=empty, lmstudio_dirs=[]))


class Harness:
    """An engine over a fresh store and registry, and the turns layer that feeds it."""

    def __init__(self, runtime: ModelRuntime, max_batch: int, max_bytes: int = 1 << 30):
        self.runtime = runtime
        self.store = CacheStore(MlxCacheOps(), fingerprint=runtime.fingerprint, max_bytes=max_bytes)
        self.registry = ConversationRegistry()
        self.engine = Engine(runtime, self.store, self.registry, max_batch=max_batch)
        self.turns = Turns(self.engine, self.registry, host_for(self.engine))
        self.engine.start()

    def submit(self, key: str, content: str, *, revision: int = 0, max_tokens: int = MAX_TOKENS):
        messages = [{"role": "user", "content": content}]
        if revision == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        return self.turns.submit(key, messages, [], reset=revision == 0, base_revision=revision,
                                 sampling=Sampling(), max_tokens=max_tokens)

    def submit_together(self, requests: list[tuple]) -> list:
        """Queue every turn, ``(key, content, revision[, max_tokens])``, while the engine
        thread is held by a task, then let it go: the first turn starts with the others already
        waiting (a batch from its first chunk)."""
        gate, holding = threading.Event(), threading.Event()
        self.engine.post(lambda: (holding.set(), gate.wait(30)))
        assert holding.wait(30)
        try:
            return [self.submit(key, content, revision=revision, max_tokens=rest[0] if rest else MAX_TOKENS)
                    for key, content, revision, *rest in requests]
        finally:
            gate.set()

    def stop(self) -> None:
        self.engine.stop(grace_s=30)


@pytest.fixture
def harness(runtime):
    made: list[Harness] = []

    def make(max_batch: int, **kwargs) -> Harness:
        made.append(Harness(runtime, max_batch, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def outcome(turn, timeout: float = EVENT_TIMEOUT_S) -> tuple[Started, list[int], Finished]:
    """The turn's events to the end: (Started, the streamed token ids, Finished)."""
    started, ids = None, []
    while True:
        event = turn.events.get(timeout=timeout)
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Started):
            started = event
        elif isinstance(event, Text):
            ids.extend(event.token_ids)
        elif isinstance(event, Finished):
            assert started is not None
            return started, ids, event


def mlx_lm_greedy(runtime: ModelRuntime, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's greedy ids from the full prompt, no cache, end-of-turn token excluded."""
    from mlx_lm import stream_generate

    ids = []
    for r in stream_generate(runtime.model, runtime.tokenizer, prompt, max_tokens=max_tokens):
        if r.finish_reason == "stop" and r.token in runtime.eos_token_ids:
            break
        ids.append(r.token)
    return ids


def cache_matches_fresh_prefill(h: Harness, key: str, tokens: tuple[int, ...]) -> bool:
    """Whether ``key``'s stored cache holds the K/V that prefilling ``tokens`` from nothing
    computes (run on the engine thread: it owns the model)."""
    import mlx.core as mx

    def compare() -> bool:
        tier, entry = h.store._entries.get(key)
        assert tier == "memory"
        fresh = h.runtime.make_cache()
        h.runtime.prefill(list(tokens), fresh)
        for stored, ref in zip(entry.cache, fresh):
            assert stored.offset == ref.offset == len(tokens)
            for a, b in ((stored.keys, ref.keys), (stored.values, ref.values)):
                if not mx.allclose(a[..., : len(tokens), :], b[..., : len(tokens), :], atol=1e-4).item():
                    return False
        return True

    return h.engine.call(compare, timeout=60)


def test_a_lone_turn_runs_serially_and_equals_mlx_lm(harness, runtime, caplog):
    h = harness(max_batch=4)
    with caplog.at_level(logging.INFO, logger="mlxkvd.engine"):
        turn = h.submit("lone", QUESTIONS[1])
        started, ids, done = outcome(turn)
    assert "batching:" not in caplog.text
    assert started.cached_tokens == 0 and done.prompt_tokens == len(turn.prompt.ids)
    assert ids == mlx_lm_greedy(runtime, list(turn.prompt.ids), MAX_TOKENS)
    # The prompt the engine ran is the chat template's, tokenized whole.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    assert list(turn.prompt.ids) == list(runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_simultaneous_turns_are_batched_and_check_their_caches_in(harness, runtime, caplog):
    h = harness(max_batch=ROWS)
    keys = [f"row{i}" for i in range(ROWS)]
    with caplog.at_level(logging.INFO, logger="mlxkvd.engine"):
        turns = h.submit_together([(k, q, 0) for k, q in zip(keys, QUESTIONS)])
        results = [outcome(t) for t in turns]
    assert "batching:" in caplog.text

    held = {}
    agree = 0
    for key, turn, (started, ids, done) in zip(keys, turns, results):
        prompt = list(turn.prompt.ids)
        assert started.cached_tokens == 0 and done.completion_tokens >= len(ids) > 0
        # Checked in, holding exactly the prompt and every generated token (an end-of-turn
        # token included: the cache was fed it).
        tier, tokens, nbytes = h.store.entry_info(key)
        assert tier == "memory" and nbytes > 0
        assert len(tokens) == len(prompt) + done.completion_tokens
        assert list(tokens[: len(prompt) + len(ids)]) == prompt + ids
        assert cache_matches_fresh_prefill(h, key, tokens), key
        held[key] = (tokens, done.revision)
        agree += ids == mlx_lm_greedy(runtime, prompt, MAX_TOKENS)
    # Batched rows are not bit-identical to a lone run (other matmul shapes, padded attention);
    # on this random model every row still agrees (a greedy flip needs a near-tie).
    assert agree == ROWS, f"{agree}/{ROWS} rows equal mlx-lm's lone greedy run"
    assert h.store.stats()["memory"]["in_flight_bytes"] == 0  # every lease ended
    assert h.engine.active_requests == 0

    # The next turn of each conversation, again all at once: each reuses its cache, every
    # token of it that the new prompt still starts with. (A random model's reply is arbitrary
    # tokens, which the chat template's re-rendered text need not tokenize back into: the
    # real model's replies do, see test_batching.py, where the whole cache is reused.)
    nexts = h.submit_together([(k, "And then?", held[k][1]) for k in keys])
    for key, turn, previous in zip(keys, nexts, turns):
        started, ids, done = outcome(turn)
        tokens = held[key][0]
        prompt = list(turn.prompt.ids)
        assert started.cache_source == "conversation"
        assert started.cached_tokens == common_prefix_length(tokens, prompt), (key, started.cache_miss_reason)
        assert started.cached_tokens >= len(previous.prompt.ids) - 1  # the whole previous prompt
        assert ids == mlx_lm_greedy(runtime, prompt, MAX_TOKENS)


def test_at_debug_level_a_batch_step_that_prefilled_says_where_its_time_went(harness, caplog):
    h = harness(max_batch=ROWS)
    with caplog.at_level(logging.DEBUG, logger="mlxkvd.engine"):
        turns = h.submit_together([(f"dbg{i}", q, 0) for i, q in enumerate(QUESTIONS)])
        cached = [outcome(turn)[0].cached_tokens for turn in turns]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch step")]
    assert lines, "no batch step line"
    prefilled = sum(int(line.split("ms, ")[1].split(" prompt tokens")[0]) for line in lines)
    # The rows that joined the first one (prefilled alone before it handed itself over) went
    # through the batch's prefill: their prompts less the cached part and the last token, which
    # their first decode step feeds.
    assert prefilled == sum(len(t.prompt.ids) - c - 1 for t, c in zip(turns[1:], cached[1:]))


def test_max_batch_one_runs_turns_one_at_a_time(harness, runtime, caplog):
    h = harness(max_batch=1)
    with caplog.at_level(logging.INFO, logger="mlxkvd.engine"):
        turns = h.submit_together([(f"s{i}", q, 0) for i, q in enumerate(QUESTIONS)])
        results = [outcome(t) for t in turns]
    assert "batching" not in caplog.text
    for turn, (started, ids, done) in zip(turns, results):
        assert ids == mlx_lm_greedy(runtime, list(turn.prompt.ids), MAX_TOKENS)
    # One at a time: each turn waited for those before it (queue time grows with the order).
    queue_s = [r[2].queue_s for r in results]
    assert queue_s == sorted(queue_s) and queue_s[-1] > queue_s[0], queue_s


def test_a_cancelled_row_leaves_within_a_step_and_the_others_go_on(harness, runtime):
    h = harness(max_batch=ROWS)
    turns = h.submit_together([(f"c{i}", q, 0) for i, q in enumerate(QUESTIONS)])
    victim = turns[1]
    # Cancel after its second token, from the reading side, as the service does.
    seen = 0
    while seen < 2:
        event = victim.events.get(timeout=EVENT_TIMEOUT_S)
        seen += isinstance(event, Text)
    h.turns.cancel(victim)
    while not isinstance(event := victim.events.get(timeout=EVENT_TIMEOUT_S), Failed):
        pass
    assert victim.generated - victim.generated_at_cancel <= 1
    for i, turn in enumerate(turns):
        if turn is victim:
            continue
        _, ids, _ = outcome(turn)
        assert ids == mlx_lm_greedy(runtime, list(turn.prompt.ids), MAX_TOKENS), i
    # The cancelled row's cache was kept (nothing committed), holding what it had computed.
    tier, tokens, _ = h.store.entry_info("c1")
    assert list(tokens[: len(victim.prompt.ids)]) == list(victim.prompt.ids)
    assert h.registry.peek("c1") is None or h.registry.peek("c1")[2] == 0


def test_a_waiting_turn_is_admitted_only_when_the_budget_has_room(harness, runtime):
    """With room for one turn's reservation beside nothing else, queued turns run one after
    another even in batch mode, and their wait shows as queue time."""
    reserve = runtime.kv_nbytes(len(runtime.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[3]}],
        add_generation_prompt=True)) + MAX_TOKENS)
    h = harness(max_batch=ROWS, max_bytes=reserve + reserve // 2)
    turns = h.submit_together([(f"b{i}", q, 0) for i, q in enumerate(QUESTIONS)])
    results = [outcome(t) for t in turns]
    assert all(r[2].completion_tokens > 0 for r in results)
    assert max(r[2].queue_s for r in results[1:]) > 0
    stats = h.store.stats()["memory"]
    assert stats["in_flight_bytes"] == 0 and stats["bytes"] <= stats["budget_bytes"]


def test_deleting_a_conversation_mid_batch_fails_only_its_turn(harness):
    h = harness(max_batch=ROWS)
    turns = h.submit_together([("del0", QUESTIONS[1], 0), ("del1", QUESTIONS[2], 0)])
    event = None
    while not isinstance(event, Text):
        event = turns[0].events.get(timeout=EVENT_TIMEOUT_S)
    h.registry.delete("del0")  # what the DeleteConversation RPC does first
    with pytest.raises(ConversationNotFoundError):
        outcome(turns[0], timeout=10)
    assert h.engine.alive, "the engine thread died"
    outcome(turns[1], timeout=10)


def test_a_row_whose_reply_fails_fails_alone(harness, monkeypatch):
    """A row's own failure while its token is handled (its reply's parser raising, say) fails
    that turn only: the other rows finish and the engine goes on."""
    from mlxkvd.running import RunningTurn

    h = harness(max_batch=ROWS)
    on_token = RunningTurn.on_token

    def failing(self, token):
        if self.key == "bad" and len(self.generated) == 2:
            raise ValueError("the reply parser broke")
        return on_token(self, token)

    monkeypatch.setattr(RunningTurn, "on_token", failing)
    turns = h.submit_together([("bad", QUESTIONS[1], 0), ("good", QUESTIONS[2], 0)])
    with pytest.raises(ValueError, match="parser broke"):
        outcome(turns[0])
    outcome(turns[1])
    assert h.engine.alive, "the engine thread died"
    outcome(h.submit("bad2", QUESTIONS[0]))  # and serves the next turn


def test_a_cancelled_row_whose_cache_cannot_be_kept_fails_alone(harness, monkeypatch):
    """Keeping a cancelled row's cache failing (a store error, say) fails that turn with the
    error, as a serial turn does; the other rows finish and the engine goes on."""
    from mlxkvd.running import RunningTurn

    def failing(self, cache, held):
        raise OSError("the store refused the cache")

    monkeypatch.setattr(RunningTurn, "cancelled", failing)
    h = harness(max_batch=ROWS)
    turns = h.submit_together([("cx0", QUESTIONS[1], 0), ("cx1", QUESTIONS[2], 0)])
    victim = turns[0]
    while not isinstance(victim.events.get(timeout=EVENT_TIMEOUT_S), Text):
        pass
    h.turns.cancel(victim)
    with pytest.raises(OSError, match="store refused"):
        outcome(victim)
    outcome(turns[1])
    assert h.engine.alive, "the engine thread died"


def test_a_cancelled_waiting_turn_leaves_without_waiting_for_room(harness, runtime):
    reserve = runtime.kv_nbytes(200)  # each turn below: ~25 prompt tokens + 200, one 256-token step
    h = harness(max_batch=ROWS, max_bytes=reserve + reserve // 2)  # one turn in flight at a time
    order: list[tuple[str, str]] = []
    lock = threading.Lock()

    def read(name: str, turn) -> None:
        while True:
            event = turn.events.get(timeout=EVENT_TIMEOUT_S)
            if isinstance(event, (Finished, Failed)):
                with lock:
                    order.append((name, type(event).__name__))
                return

    gate, holding = threading.Event(), threading.Event()
    h.engine.post(lambda: (holding.set(), gate.wait(30)))
    assert holding.wait(30)
    first = h.submit("w0", "Hi.", max_tokens=200)
    second = h.submit("w1", "Hello.", max_tokens=200)
    third = h.submit("w2", "Hey.", max_tokens=200)
    h.turns.cancel(third)  # its client left while it waited
    gate.set()
    readers = [threading.Thread(target=read, args=(n, t)) for n, t in (("first", first), ("second", second),
                                                                      ("third", third))]
    for r in readers:
        r.start()
    for r in readers:
        r.join(EVENT_TIMEOUT_S)
    assert ("third", "Failed") in order
    assert order.index(("third", "Failed")) == 0, order


def test_a_handed_over_turn_gets_a_token_from_every_batch_step(harness, runtime, monkeypatch):
    """The step that hands a decoding serial turn over to a batch gives it its next token (its
    row, one re-fed token to go, decodes at once), and so does every step while a newcomer
    prefills."""
    import mlxkvd.batch

    h = harness(max_batch=ROWS)
    steps: list[set[str]] = []  # per batch step: the conversations that got a token
    step = mlxkvd.batch.Batch.step

    def counted(self):
        out = step(self)
        steps.append({s.run.key for s in out})
        return out

    monkeypatch.setattr(mlxkvd.batch.Batch, "step", counted)
    streaming = h.submit("a", "Count from 1 to 100.", max_tokens=60)
    texts = 0
    while texts < 2:
        texts += isinstance(streaming.events.get(timeout=EVENT_TIMEOUT_S), Text)
    facts = " ".join(f"Fact {i}: box {i} holds {i * 7 % 13} marbles." for i in range(150))
    newcomer = h.submit("b", facts, max_tokens=2)
    assert len(newcomer.prompt.ids) > 3 * runtime.prefill_step  # several chunks
    outcome(newcomer)
    while not isinstance(streaming.events.get(timeout=EVENT_TIMEOUT_S), Finished):
        pass
    # Every step while "a" was a row and "b" prefilled gave "a" a token.
    prefill_steps = steps[: next(i for i, s in enumerate(steps) if "b" in s)]
    assert len(prefill_steps) >= 3
    assert all("a" in s for s in prefill_steps), [sorted(s) for s in steps[:8]]


def facts(n: int) -> str:
    """A long user message: ``n`` short facts (about 15 tokens each)."""
    return " ".join(f"Fact {i}: box {i} holds {i * 7 % 13} marbles." for i in range(n))


def record_steps(monkeypatch) -> list[tuple[frozenset, int]]:
    """Per batch step, from now on: the conversations that got a token, and the prompt tokens
    the step prefilled (mlx-lm's own count)."""
    import mlxkvd.batch

    steps: list[tuple[frozenset, int]] = []
    step = mlxkvd.batch.Batch.step

    def recorded(self):
        with self._gen.stats() as stats:
            out = step(self)
        steps.append((frozenset(s.run.key for s in out), stats.prompt_tokens))
        return out

    monkeypatch.setattr(mlxkvd.batch.Batch, "step", recorded)
    return steps


def prompt_tokens(runtime: ModelRuntime, content: str) -> int:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return len(runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_a_turn_handed_over_in_its_prefill_decodes_right_after_its_last_chunk(harness, runtime, monkeypatch):
    """The serial turn hands over before its first chunk (a turn waits); in the batch its
    first token comes from the step after its last prefill chunk, not one step later (which
    would cost it one more of the newcomer's chunks)."""
    h = harness(max_batch=ROWS)
    steps = record_steps(monkeypatch)
    step = runtime.prefill_step
    first, newcomer = h.submit_together([("a", facts(step // 6), 0, 4), ("b", facts(step // 3), 0, 2)])
    outcome(first)
    outcome(newcomer)
    chunks = -(-(len(first.prompt.ids) - 1) // step)  # its last prompt token is fed by its first decode
    assert chunks >= 2
    got_token = [i for i, (keys, _) in enumerate(steps) if "a" in keys]
    assert got_token[0] == chunks, [sorted(keys) for keys, _ in steps[: chunks + 2]]


def test_a_streaming_row_waits_one_newcomers_chunk_per_token(harness, runtime, monkeypatch):
    """Two newcomers arrive while a turn streams: a forward pass over many tokens costs what
    its tokens cost, so each batch step prefills one chunk of one newcomer at most, and the
    streaming row's tokens are never further apart than one chunk."""
    h = harness(max_batch=ROWS)
    steps = record_steps(monkeypatch)
    streaming, *newcomers = h.submit_together([("a", "Count from 1 to 100.", 0, 60),
                                               ("b", facts(runtime.prefill_step // 7), 0, 2),
                                               ("c", facts(runtime.prefill_step // 6), 0, 2)])
    for turn in newcomers:
        assert len(turn.prompt.ids) > 2 * runtime.prefill_step  # several chunks each
        outcome(turn)
    outcome(streaming)
    # Up to the step that gave both newcomers their first token.
    until = max(next(i for i, (keys, _) in enumerate(steps) if key in keys) for key in ("b", "c"))
    assert until >= 4
    prefilled = [n for _, n in steps[: until + 1]]
    assert max(prefilled) <= runtime.prefill_step, prefilled
    assert all("a" in keys for keys, _ in steps[: until + 1]), [sorted(keys) for keys, _ in steps]


def test_a_batched_rows_cache_is_held_by_the_batch_alone(harness, monkeypatch):
    """Once a row's cache is in the batch (copied into its batch cache), neither the running
    turn nor its lease keeps the original: its memory is not held twice."""
    import gc
    import weakref

    import mlxkvd.batch

    h = harness(max_batch=ROWS)
    added: list[tuple[object, weakref.ref]] = []
    held: list[tuple[int, str]] = []  # (step, conversation) whose original cache is still alive
    add, step = mlxkvd.batch.Batch.add, mlxkvd.batch.Batch.step

    def recorded_add(self, run, *args, **kwargs):
        added.append((run, weakref.ref(run.cache[0])))
        return add(self, run, *args, **kwargs)

    def checked_step(self):
        out = step(self)
        gc.collect()
        for run, layer in added:
            if run.cache is not None or run.lease.lookup.cache is not None or layer() is not None:
                held.append((len(out), run.key))
        return out

    monkeypatch.setattr(mlxkvd.batch.Batch, "add", recorded_add)
    monkeypatch.setattr(mlxkvd.batch.Batch, "step", checked_step)
    # The first turn runs serially, hands over after its first token (its cache from the
    # serial run); the second joins with a fresh cache.
    turns = h.submit_together([("h0", QUESTIONS[0], 0), ("h1", QUESTIONS[1], 0)])
    for turn in turns:
        outcome(turn)
    assert sorted(run.key for run, _ in added) == ["h0", "h1"]
    assert not held, held


def test_admission_counts_the_padding_of_batched_caches(harness, runtime):
    """A batch pads every row's cache to its longest row: a short turn beside a long one costs
    what the long one costs. With room for both reservations, not for the short one padded to
    the long one's length, the short turn waits for the long one to end; two short turns still
    run together under the same budget."""
    long_text = facts(runtime.prefill_step // 5)
    long_len = prompt_tokens(runtime, long_text) + MAX_TOKENS
    short_len = prompt_tokens(runtime, QUESTIONS[0]) + MAX_TOKENS
    reserve_long, reserve_short = runtime.kv_nbytes(long_len), runtime.kv_nbytes(short_len)
    assert reserve_long >= 3 * reserve_short
    h = harness(max_batch=ROWS, max_bytes=reserve_long + 2 * reserve_short)

    def overlapped(first, second) -> bool:
        (_, _, a), (_, _, b) = outcome(first), outcome(second)
        started_b = second.submitted_at + b.queue_s
        return started_b < first.submitted_at + a.total_s

    long_turn, short_turn = h.submit_together([("p-long", long_text, 0), ("p-short", QUESTIONS[0], 0)])
    assert not overlapped(long_turn, short_turn), "the short turn ran beside the long one"
    assert h.store.stats()["memory"]["in_flight_bytes"] == 0
    one, two = h.submit_together([("p-one", QUESTIONS[0], 0, 40), ("p-two", QUESTIONS[2], 0, 40)])
    assert overlapped(one, two), "two short turns did not run together"
    assert h.store.stats()["memory"]["in_flight_bytes"] == 0


def test_the_status_snapshot_is_current_at_every_batch_step(harness, monkeypatch):
    """What GetStatus shows follows admissions and rows' ends in batch mode, not only the
    batch's end."""
    import mlxkvd.batch

    h = harness(max_batch=ROWS)
    stale: list[dict] = []
    step = mlxkvd.batch.Batch.step

    def checked(self):
        if h.engine.store_stats() != h.store.stats():
            stale.append({"shown": h.engine.store_stats()["memory"], "store": h.store.stats()["memory"]})
        return step(self)

    monkeypatch.setattr(mlxkvd.batch.Batch, "step", checked)
    turns = h.submit_together([("st0", QUESTIONS[0], 0, 2), ("st1", QUESTIONS[1], 0, 4),
                               ("st2", QUESTIONS[2], 0, 30)])
    for turn in turns:
        outcome(turn)
    assert not stale, stale[:3]


def test_if_the_engine_thread_dies_in_batch_mode_every_turn_gets_failed(harness, monkeypatch):
    """An exception that escapes the engine's per-step handling kills its thread: the batch's
    rows and the turns waiting for admission fail, as queued ones do; no client hangs."""
    import queue

    import mlxkvd.batch

    class Crash(BaseException):  # not an Exception: the batch step's own handler lets it through
        pass

    h = harness(max_batch=2)
    calls = []
    step = mlxkvd.batch.Batch.step

    def crashing(self):
        calls.append(len(self))
        if len(calls) == 2:
            raise Crash("injected")
        return step(self)

    monkeypatch.setattr(mlxkvd.batch.Batch, "step", crashing)
    turns = h.submit_together([(f"die{i}", q, 0, 30) for i, q in enumerate(QUESTIONS)])
    ends = []
    for turn in turns:
        while True:
            try:
                event = turn.events.get(timeout=20)
            except queue.Empty:
                ends.append(None)
                break
            if isinstance(event, (Finished, Failed)):
                ends.append(type(event).__name__)
                break
    assert calls[:2] == [2, 2]  # two rows; two turns waited for admission
    assert ends == ["Failed"] * len(turns), ends
    assert not h.engine.alive
    assert h.engine.active_requests == 0


def test_a_seeded_sampled_turn_gives_the_same_reply_batched_as_alone(harness):
    """A seeded turn draws from a random stream of its own (``runtime.SeededSampler``): the
    same reply alone, again, and as a batch row beside another sampled row."""
    h = harness(max_batch=ROWS)
    seeded = Sampling(temperature=1.0, seed=7)

    def submit(key: str, content: str, sampling: Sampling):
        return h.turns.submit(key, [{"role": "user", "content": content}], [], reset=True, base_revision=0,
                              sampling=sampling, max_tokens=MAX_TOKENS)

    alone = outcome(submit("seed-alone", QUESTIONS[2], seeded))[1]
    assert outcome(submit("seed-alone-again", QUESTIONS[2], seeded))[1] == alone
    gate, holding = threading.Event(), threading.Event()
    h.engine.post(lambda: (holding.set(), gate.wait(30)))
    assert holding.wait(30)
    batched = submit("seed-batched", QUESTIONS[2], seeded)
    other = submit("seed-other", QUESTIONS[0], Sampling(temperature=1.0, seed=3))
    gate.set()
    outcome(other)
    assert outcome(batched)[1] == alone


def test_a_seeded_turn_handed_over_to_a_batch_mid_reply_keeps_its_reply(harness, caplog):
    """A seeded turn running alone becomes a batch row when another turn arrives after a few
    of its tokens: the row re-draws the token mlx-lm's look-ahead had drawn (the sampler's
    stream is rewound), so the reply is the one it gives alone."""
    h = harness(max_batch=ROWS)
    seeded = Sampling(temperature=1.0, seed=11)

    def submit(key: str, content: str, sampling: Sampling, max_tokens: int = 200):
        return h.turns.submit(key, [{"role": "user", "content": content}], [], reset=True, base_revision=0,
                              sampling=sampling, max_tokens=max_tokens)

    alone = outcome(submit("handover-alone", QUESTIONS[1], seeded))[1]
    caplog.set_level(logging.INFO, logger="mlxkvd.engine")
    running = submit("handover-batched", QUESTIONS[1], seeded)
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while running.generated < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    other = submit("handover-other", QUESTIONS[0], Sampling(temperature=1.0, seed=5), max_tokens=8)
    batched = outcome(running)[1]
    outcome(other)
    assert "batching: another turn arrived" in caplog.text  # it was handed over mid-reply
    assert len(alone) > 3
    assert batched == alone
