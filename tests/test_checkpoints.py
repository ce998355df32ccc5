"""Turn-boundary checkpoints end to end.

A recurrent (or sliding-window) cache cannot be trimmed back to where a regenerated or edited
turn diverges, so after each turn the daemon also keeps a copy of the cache at the turn
boundary: the end of the last user message, before the generation prompt. A regenerate resumes
from it (source ``checkpoint``) and prefills only the generation prompt. These tests run a real
daemon on a tiny random Mamba model (the default model's caches can be trimmed and never need
checkpoints) and check every answer against mlx-lm with no cache.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import Reference, tier, wait_for

from mlxkv import Client

pytestmark = [pytest.mark.model]

MAX_TOKENS = 8
SYSTEM = "You are a terse assistant."
FIRST = "Name a fruit."
SECOND = "What is a Unix socket?"
SECOND_EDITED = "What is a TCP port?"

TINY_MAMBA = dict(
    model_type="mamba",
    hidden_size=32,
    intermediate_size=64,
    state_size=8,
    num_hidden_layers=2,
    conv_kernel=4,
    use_bias=False,
    use_conv_bias=True,
    time_step_rank=4,
    tie_word_embeddings=True,
)


def history_of(turn) -> int:
    return turn.prompt_tokens + turn.completion_tokens


def write_tiny_mamba(directory: Path, tokenizer_dir: Path, seed: int) -> None:
    """A random 2-layer Mamba with the default model's tokenizer and chat template.

    With tied embeddings and small mixer outputs, the residual stream is mostly the input
    token's embedding, which the tied head maps back to that token: every reply repeats the
    last prompt token. Larger mixer outputs and a slowly decaying state make replies depend on
    the whole history, so that resuming from the wrong state gives a different answer.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mamba

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = dict(TINY_MAMBA, vocab_size=vocab_size)
    mx.random.seed(seed)
    model = mamba.Model(mamba.ModelArgs(**config))
    for layer in model.backbone.layers:
        layer.mixer.out_proj.weight = layer.mixer.out_proj.weight * 30
        layer.mixer.A_log = layer.mixer.A_log + mx.log(mx.array(0.01))
    mx.eval(model.parameters())
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(config))


def script(first_reply: str = "", second: str = SECOND) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    if first_reply:
        messages += [{"role": "assistant", "content": first_reply}, {"role": "user", "content": second}]
    return messages


def streamed_text(tokenizer, token_ids: list[int]) -> str:
    """The reply text as the daemon stores it: mlx-lm's streaming detokenizer drops the
    leading space of a reply, which then does not render back to the same tokens."""
    detok = tokenizer.detokenizer
    detok.reset()
    for token in token_ids:
        detok.add_token(token)
    detok.finalize()
    return detok.text


def makes_meaningful_checks(ref: Reference) -> bool:
    """Whether this model's greedy replies to the scripted turns vary, depend on more than
    the last message, and round-trip through the chat template (so that turn 2 can reuse
    all of turn 1)."""
    tok = ref.tokenizer
    first = ref.generate(script(), MAX_TOKENS)
    if len(set(first)) < 3:
        return False
    reply = streamed_text(tok, first)
    history = ref.prompt(script())
    if ref.prompt(script(reply))[: len(history) + len(first)] != history + first:
        return False
    second = ref.generate(script(reply), MAX_TOKENS)
    edited = ref.generate(script(reply, SECOND_EDITED), MAX_TOKENS)
    without_history = ref.generate(script(reply)[:1] + script(reply)[-1:], MAX_TOKENS)
    return len(set(second)) >= 3 and second != edited and second != without_history


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, model_dir) -> tuple[Path, Reference]:
    """The tiny Mamba's directory and its no-cache mlx-lm reference. Random weights differ in
    how informative they are: the first seed whose replies make the checks meaningful wins."""
    root = tmp_path_factory.mktemp("tiny-mamba")
    for seed in range(16):
        directory = root / f"seed{seed}"
        write_tiny_mamba(directory, model_dir, seed)
        ref = Reference(directory)
        if makes_meaningful_checks(ref):
            return directory, ref
    raise AssertionError("no seed gave a tiny model with varied, history-dependent replies")


def boundary_of(ref: Reference, messages: list[dict]) -> int:
    """Tokens of the rendered history without the generation prompt."""
    return len(ref.tokenizer.apply_chat_template(messages, add_generation_prompt=False))


def two_turns(client: Client, ref: Reference):
    conv = client.conversation(system=SYSTEM)
    first = conv.send(FIRST, max_tokens=MAX_TOKENS)
    assert first.cache_source == "none", first.cache_miss_reason
    assert first.token_ids == ref.generate(conv.messages[:-1], MAX_TOKENS)
    second = conv.send(SECOND, max_tokens=MAX_TOKENS)
    assert second.token_ids == ref.generate(conv.messages[:-1], MAX_TOKENS)
    return conv, first, second


def assert_resumed_from_checkpoint(turn, ref: Reference, history: list[dict]) -> None:
    boundary = boundary_of(ref, history)
    prompt = ref.prompt(history)
    assert turn.cache_source == "checkpoint", turn.cache_miss_reason
    assert turn.cached_tokens == boundary
    assert turn.prompt_tokens == len(prompt)
    # Only the generation prompt ("<|im_start|>assistant\n") is prefilled.
    assert turn.prefill_tokens == len(prompt) - boundary
    assert 0 < turn.prefill_tokens <= 5
    assert "checkpoint" in turn.cache_miss_reason
    assert turn.token_ids == ref.generate(history, MAX_TOKENS)


def test_regenerate_resumes_from_the_turn_boundary_checkpoint(make_daemon, tiny_model, tmp_path):
    model, ref = tiny_model
    daemon = make_daemon("--model", str(model), cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conv, first, second = two_turns(client, ref)
        # Turn 2 continues turn 1's cache: the whole history, generated tokens included.
        assert second.cache_source == "conversation", second.cache_miss_reason
        assert second.cached_tokens == history_of(first)
        # The conversation's cache and its checkpoint.
        assert tier(client.status(), "memory").entries == 2

        history = conv.messages[:-1]
        again = conv.regenerate(max_tokens=MAX_TOKENS)
        assert_resumed_from_checkpoint(again, ref, history)
        assert again.token_ids == second.token_ids  # greedy: the same reply
        # The regenerated turn keeps a checkpoint at the same boundary: it works twice.
        third = conv.regenerate(max_tokens=MAX_TOKENS)
        assert_resumed_from_checkpoint(third, ref, history)
        assert tier(client.status(), "memory").entries == 2


def test_an_edit_before_the_boundary_does_not_use_the_checkpoint(make_daemon, tiny_model, tmp_path):
    model, ref = tiny_model
    daemon = make_daemon("--model", str(model), cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        conv, _, second = two_turns(client, ref)
        conv.reset(conv.messages[:3])  # drop the last question and its answer
        edited = conv.send(SECOND_EDITED, max_tokens=MAX_TOKENS)
        history = conv.messages[:-1]
        # The edit diverges inside the last user message, before the checkpoint's end, and
        # neither cache can be trimmed back to it: nothing on this daemon is a prefix of the
        # edited prompt, so it is prefilled in full.
        assert edited.cache_source == "none", edited.cache_miss_reason
        assert edited.cached_tokens == 0
        assert "cannot be trimmed" in edited.cache_miss_reason
        assert edited.token_ids == ref.generate(history, MAX_TOKENS)
        assert edited.token_ids != second.token_ids

        # The edited turn has its own checkpoint now.
        again = conv.regenerate(max_tokens=MAX_TOKENS)
        assert_resumed_from_checkpoint(again, ref, history)


def test_checkpoint_survives_sigkill_and_goes_with_the_conversation(make_daemon, tiny_model, tmp_path):
    model, ref = tiny_model
    cache = tmp_path / "cache"
    daemon = make_daemon("--model", str(model), cache=cache)
    with Client(daemon.socket) as client:
        conv, _, second = two_turns(client, ref)
        # Written behind once the daemon is idle: the conversation's cache and its checkpoint.
        wait_for(lambda: tier(client.status(), "disk").entries == 2)

        daemon.restart(signal.SIGKILL)

        status = client.status()
        assert tier(status, "disk").entries == 2
        assert tier(status, "memory").entries == 0
        history = conv.messages[:-1]
        again = conv.regenerate(max_tokens=MAX_TOKENS)
        assert_resumed_from_checkpoint(again, ref, history)
        assert again.token_ids == second.token_ids

        client.delete_conversation(conv.conversation_id)
        # The status counts are a snapshot the engine refreshes right after the delete.
        wait_for(lambda: (s := client.status()) and tier(s, "memory").entries == 0
                 and tier(s, "disk").entries == 0, timeout=5)
        assert not list((cache / "kv").glob("*.safetensors"))


def test_trimmable_caches_keep_no_checkpoints(make_daemon, tmp_path):
    """The default model's KVCache can be trimmed: one entry per conversation, no more."""
    cache = tmp_path / "cache"
    daemon = make_daemon(cache=cache)
    with Client(daemon.socket) as client:
        convs = [client.conversation(system=f"{SYSTEM} You are assistant number {i}.") for i in range(2)]
        for conv in convs:
            conv.send(FIRST, max_tokens=MAX_TOKENS)
            conv.send(SECOND, max_tokens=MAX_TOKENS)
        again = convs[0].regenerate(max_tokens=MAX_TOKENS)
        assert again.cache_source == "conversation", again.cache_miss_reason
        assert tier(client.status(), "memory").entries == len(convs)
        wait_for(lambda: tier(client.status(), "disk").entries == len(convs))
        time.sleep(2)  # any further write-behind would have happened by now
        status = client.status()
        assert tier(status, "memory").entries == len(convs)
        assert tier(status, "disk").entries == len(convs)
        assert len(list((cache / "kv").glob("*.safetensors"))) == len(convs)
