"""Warm-ups (``Warm``, ``Conversation.warm``) on a real daemon and the default model.

A draft of the next message is prefilled while the user types; the message sent afterwards
prefills only what changed since the draft, and its greedy reply still equals mlx-lm's from the
full prompt without a cache. Warm-ups run below turns (another client's turn waits at most one
prefill chunk) and a newer warm-up supersedes an older one.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

import httpd

from mlxkv import Client
from mlxkv.conversation import Conversation
from mlxkv.errors import MlxkvError
from mlxkv.v1 import inference_pb2 as pb
from mlxkvd.runtime import PREFILL_STEP_CPU
from mlxkvd.store import common_prefix_length

pytestmark = pytest.mark.model

SYSTEM = "You are a concise assistant."
MAX_TOKENS = 10


def in_background(chat, draft: str) -> tuple[threading.Thread, dict]:
    """``chat.warm(draft)`` on a thread: its answer lands in the dict (``"w"``)."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(w=chat.warm(draft)))
    thread.start()
    return thread, outcome


def long_text(words: int) -> str:
    return " ".join(f"item{i % 97} is listed under section {i % 13}." for i in range(words // 6))


@pytest.fixture(scope="module")
def client(shared_daemon):
    with Client(shared_daemon.socket, timeout=300) as c:
        yield c


@pytest.mark.parametrize("final", ["extends", "edits"])
def test_the_message_sent_after_a_warm_up_prefills_only_what_changed(client, reference, final):
    chat = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
    chat.send("Hello!")
    draft = "Please list three things that make a good code review, and say why each"
    message = draft + " one matters." if final == "extends" else draft[:-4] + "of them is useful."
    warmed = chat.warm(draft)
    history = chat.messages + [{"role": "user", "content": draft}]
    draft_ids = reference.prompt(history)
    assert warmed.prompt_tokens == len(draft_ids)
    assert not warmed.superseded
    assert warmed.cached_tokens + warmed.prefilled_tokens == len(draft_ids)
    assert warmed.prefilled_tokens < len(draft_ids) - 20  # the history was cached already

    messages = chat.messages + [{"role": "user", "content": message}]
    turn = chat.send(message)
    final_ids = reference.prompt(messages)
    assert turn.prompt_tokens == len(final_ids)
    assert turn.prefill_tokens == len(final_ids) - common_prefix_length(draft_ids, final_ids)
    assert turn.text == reference.tokenizer.decode(reference.generate(messages, MAX_TOKENS))
    assert chat.revision == 2  # the warm-up made no revision


def test_a_warm_up_makes_no_revision_and_needs_the_current_one(client):
    chat = client.conversation(system=SYSTEM, max_tokens=4)
    chat.send("Hi.")
    chat.warm("What is")
    record = client.get_conversation(chat.conversation_id)
    assert record.revision == 1 and len(record.messages) == 3
    with pytest.raises(MlxkvError) as caught:
        client.warm(pb.WarmRequest(conversation_id=chat.conversation_id, base_revision=7,
                                   messages=[pb.Message(role="user", content="x")]))
    assert "revision" in str(caught.value)
    with pytest.raises(MlxkvError):
        client.warm(pb.WarmRequest(conversation_id="", messages=[pb.Message(role="user", content="x")]))


def test_a_turn_arriving_during_a_long_warm_up_starts_within_one_chunk(shared_daemon, client, reference):
    """Another client's turn waits for at most the warm-up's chunk in progress; the warm-up
    then resumes and completes (not superseded: the turn was another conversation's)."""
    chat = client.conversation(system=SYSTEM, max_tokens=4)
    chat.send("Hi.")
    draft = "Summarise this list: " + long_text(2000)
    outcome: dict = {}

    def warm() -> None:
        outcome["warmed"] = chat.warm(draft)
        outcome["warmed_at"] = time.perf_counter()

    thread = threading.Thread(target=warm)
    thread.start()
    # Past the warm-up's first chunk: it is prefilling (tokens_prefilled grows by chunks).
    before = client.status().tokens_prefilled
    deadline = time.monotonic() + 120
    while client.status().tokens_prefilled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    with Client(shared_daemon.socket, timeout=300) as other:
        other_chat = other.conversation(system=SYSTEM, max_tokens=4)
        turn = other_chat.send("Name a colour.")
        turn_done = time.perf_counter()
    thread.join(timeout=300)
    warmed = outcome["warmed"]
    assert not warmed.superseded
    assert warmed.cached_tokens + warmed.prefilled_tokens == warmed.prompt_tokens
    assert turn_done < outcome["warmed_at"]  # the turn did not wait for the whole warm-up
    chunks = warmed.prefilled_tokens / PREFILL_STEP_CPU
    assert chunks >= 4
    # The warm-up's own time per chunk (its total, less the turn it paused for).
    chunk_s = (warmed.total_s - turn.total_s) / chunks
    queue_s = turn.done.timings.queue_s
    assert queue_s <= 1.5 * chunk_s, (queue_s, chunk_s)


def test_a_newer_warm_up_supersedes_an_older_one(client, reference):
    chat = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
    chat.send("Hi.")
    thread, first = in_background(chat, "Summarise: " + long_text(3000))
    time.sleep(1.0)
    second = chat.warm("Which is larger, 7 or 9?")
    thread.join(timeout=300)
    assert first["w"].superseded
    assert first["w"].prefilled_tokens < first["w"].prompt_tokens - first["w"].cached_tokens
    assert not second.superseded

    messages = chat.messages + [{"role": "user", "content": "Which is larger, 7 or 9?"}]
    turn = chat.send("Which is larger, 7 or 9?")
    assert turn.prefill_tokens == 1  # the whole draft was the message: one token is fed again
    assert turn.text == reference.tokenizer.decode(reference.generate(messages, MAX_TOKENS))


def test_a_turn_supersedes_the_warm_up_of_its_conversation(client, reference):
    chat = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
    chat.send("Hi.")
    thread, outcome = in_background(chat, "Summarise: " + long_text(3000))
    time.sleep(1.0)
    messages = chat.messages + [{"role": "user", "content": "Say yes."}]
    turn = Conversation(client, chat.conversation_id, messages=chat.messages, revision=chat.revision,
                        max_tokens=MAX_TOKENS).send("Say yes.")  # another handle on the same conversation
    thread.join(timeout=300)
    assert outcome["w"].superseded
    assert turn.text == reference.tokenizer.decode(reference.generate(messages, MAX_TOKENS))


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("warm-http"), cache_dir)
    yield d
    d.daemon.stop()


def test_http_warm_up_then_the_final_request_reuses_the_draft(served, reference):
    """Through the openai SDK: a chat, a warm-up of the draft (``POST /v1/mlxkv/warm``), then
    the final message, which prefills only what changed since the draft."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=120)
    options = {"model": httpd.MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, "prompt_cache_key": "warm"}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(messages=messages, **options).choices[0].message
    messages.append({"role": "assistant", "content": reply.content})

    draft = messages + [{"role": "user", "content": "What makes a code review useful? Give two"}]
    warmed = client.post("/mlxkv/warm", cast_to=object, body={"model": httpd.MODEL, "messages": draft,
                                                              "prompt_cache_key": "warm"})
    draft_ids = reference.prompt(draft)
    assert warmed["object"] == "mlxkv.warm" and not warmed["superseded"]
    assert warmed["prompt_tokens"] == len(draft_ids)
    assert 0 < warmed["prefilled_tokens"] < len(draft_ids) - 20  # onto the stored conversation

    final = messages + [{"role": "user", "content": "What makes a code review useful? Give two reasons."}]
    response = client.chat.completions.create(messages=final, **options)
    final_ids = reference.prompt(final)
    assert response.usage.prompt_tokens_details.cached_tokens == common_prefix_length(draft_ids, final_ids)
    assert response.choices[0].message.content == reference.tokenizer.decode(reference.generate(final, MAX_TOKENS))
