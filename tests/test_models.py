"""One resident model, chosen per request: a real daemon switching between the default model and
a second model directory made here (random weights, the default model's tokenizer), in a
models directory the catalogue lists."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from conftest import Reference, tier, wait_for

from mlxkv import Client
from mlxkv.errors import MlxkvError

MAX_TOKENS = 12
SYSTEM = "You are a terse assistant."
TINY = "tiny"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, model_dir) -> Path:
    from bench.models import TINY_2L, build_random_model

    root = tmp_path_factory.mktemp("models")
    build_random_model(root / TINY, TINY_2L, model_dir)
    return root


@pytest.fixture(scope="module")
def tiny_reference(models_dir) -> Reference:
    return Reference(models_dir / TINY)


@pytest.fixture
def daemon(make_daemon, models_dir, tmp_path):
    return make_daemon("--models-dir", str(models_dir), cache=tmp_path / "cache")


def history(conv) -> list[dict]:
    return [dict(m) for m in conv.messages]


def test_catalogue_lists_both_models_and_marks_the_loaded_one(daemon, models_dir):
    with Client(daemon.socket) as client:
        models = {m.name: m for m in client.list_models()}
        default = client.status().model
        assert models[default].loaded and models[default].source == "default" and models[default].ready
        tiny = models[TINY]
        assert not tiny.loaded and tiny.source == "models-dir" and tiny.path == str(models_dir / TINY)
        assert tiny.size_bytes > 0 and tiny.context_length > 0 and tiny.model_type == "llama"
        out = subprocess.run([sys.executable, "-m", "mlxkv.cli", "--socket", str(daemon.socket), "models"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and TINY in out.stdout and f"* {default}" in out.stdout


def test_alternating_models_keep_one_resident_and_each_ones_caches(daemon, reference, tiny_reference):
    with Client(daemon.socket) as client:
        default = client.status().model
        a = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS, model=default)
        b = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS, model=TINY)
        first = a.send("Name a colour.")
        assert first.token_ids == reference.generate(history(a)[:-1], MAX_TOKENS)
        rss_default = client.status().rss_bytes

        turn = b.send("Name a fruit.")
        status = client.status()
        assert status.model == TINY and status.model_state == "loaded"
        assert turn.token_ids == tiny_reference.generate(history(b)[:-1], MAX_TOKENS)
        # The default model's float32 weights (about 540 MB on the CPU) left memory.
        assert status.rss_bytes < rss_default - 200 * 2**20, (status.rss_bytes, rss_default)
        assert [m.name for m in client.list_models() if m.loaded] == [TINY]

        again = a.send("And another one?")  # back on the default model: its cache is on disk
        assert client.status().model == default
        assert again.cache_source == "disk" and again.cached_tokens >= first.prompt_tokens
        assert again.token_ids == reference.generate(history(a)[:-1], MAX_TOKENS)

        back = b.send("And another one?")
        # Its reply is newlines: the prompt's last one joins them when the history re-renders.
        assert back.cache_source == "disk" and back.cached_tokens >= turn.prompt_tokens - 1
        assert back.token_ids == tiny_reference.generate(history(b)[:-1], MAX_TOKENS)
        assert client.get_conversation(b.conversation_id).model == TINY


def test_a_conversation_continued_on_another_model_is_prefilled_there(daemon, tiny_reference):
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        conv.send("Name a colour.")
        turn = conv.send("And a fruit?", model=TINY)
        assert turn.cached_tokens == 0 and "ran on model" in turn.cache_miss_reason
        assert turn.token_ids == tiny_reference.generate(history(conv)[:-1], MAX_TOKENS)


def test_bad_model_requests_name_the_model_and_the_resident_one_keeps_serving(daemon, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with Client(daemon.socket) as client:
        default = client.status().model
        with pytest.raises(MlxkvError) as unknown:
            client.ask("Hi", model="no-such-model", max_tokens=2)
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in unknown.value.details
        with pytest.raises(MlxkvError) as bad:
            client.ask("Hi", model=str(not_a_model), max_tokens=2)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(not_a_model) in bad.value.details
        assert client.ask("Hi", max_tokens=2).completion_tokens >= 1
        assert client.status().model == default


def test_a_failed_load_keeps_the_daemon_serving_and_loses_no_conversation(daemon, models_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models_dir / TINY, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut halfway
    with Client(daemon.socket) as client:
        default = client.status().model
        conv = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        first = conv.send("Name a colour.")
        with pytest.raises(MlxkvError) as failed:
            client.ask("Hi", model=str(broken), max_tokens=2)
        assert failed.value.code == grpc.StatusCode.INTERNAL and str(broken) in failed.value.details
        status = client.status()
        assert status.model == default and status.model_state == "loaded"
        again = conv.send("And another one?")
        assert again.cached_tokens >= first.prompt_tokens  # its cache is still there


def test_concurrent_turns_for_two_models_never_run_on_the_wrong_weights(daemon, reference, tiny_reference):
    with Client(daemon.socket) as client:
        default = client.status().model
        convs = [client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS, model=model)
                 for model in (default, TINY, default, TINY)]
        errors: list[BaseException] = []

        def chat(conv) -> None:
            try:
                for text in ("Name a colour.", "And a fruit?"):
                    conv.send(text)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=chat, args=(c,)) for c in convs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        for conv in convs:
            ref = tiny_reference if conv.defaults["model"] == TINY else reference
            msgs = history(conv)
            assert conv.last_turn.token_ids == ref.generate(msgs[:-1], MAX_TOKENS), conv.defaults


def test_load_and_unload_rpcs_and_cli(daemon):
    cli = [sys.executable, "-m", "mlxkv.cli", "--socket", str(daemon.socket)]
    with Client(daemon.socket) as client:
        default = client.status().model
        conv = client.conversation(system=SYSTEM, max_tokens=MAX_TOKENS)
        conv.send("Name a colour.")
        loaded = client.load_model(TINY)
        assert loaded.loaded_now and loaded.model.name == TINY and loaded.load_s > 0
        assert client.load_model(TINY).loaded_now is False
        out = subprocess.run([*cli, "unload"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"{TINY}: unloaded" in out.stdout
        status = client.status()
        assert status.model_state == "unloaded" and not status.model_loaded
        out = subprocess.run([*cli, "load", default], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and f"{default}: loaded in" in out.stdout, out.stderr
        assert client.status().model == default
        wait_for(lambda: tier(client.status(), "disk").entries >= 1)
        assert conv.send("And another?").cache_source in ("memory", "disk")


def test_context_caps_per_request_and_per_model(make_daemon, models_dir, tmp_path):
    daemon = make_daemon("--models-dir", str(models_dir), "--context-length", f"{TINY}=64",
                         cache=tmp_path / "cache")
    with Client(daemon.socket) as client:
        default = client.status().model
        with pytest.raises(MlxkvError) as capped:
            client.ask("Hi " * 60, model=TINY, max_tokens=4)
        assert capped.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "64" in capped.value.details
        assert client.ask("Hi " * 60, model=default, max_tokens=4).completion_tokens >= 1  # no cap
        with pytest.raises(MlxkvError) as per_request:
            client.ask("Hi " * 60, model=default, max_tokens=4, context_length=32)
        assert per_request.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "32" in per_request.value.details


def test_http_apis_choose_the_model_by_its_name(tmp_path, cache_dir, models_dir, tiny_reference):
    import anthropic
    import httpd
    import openai

    served = httpd.start(tmp_path, cache_dir, "--models-dir", str(models_dir))
    try:
        oa = openai.OpenAI(base_url=served.url + "/v1", api_key=served.key)
        assert {httpd.MODEL, TINY} <= {m.id for m in oa.models.list()}
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a fruit."}]
        reply = oa.chat.completions.create(model=TINY, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.model == TINY
        expected = tiny_reference.tokenizer.decode(tiny_reference.generate(messages, MAX_TOKENS))
        assert reply.choices[0].message.content == expected
        with pytest.raises(openai.NotFoundError) as unknown:
            oa.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        assert unknown.value.code == "model_not_found" and "no-such-model" in unknown.value.message
        an = anthropic.Anthropic(base_url=served.url, api_key=served.key)
        answer = an.messages.create(model=httpd.MODEL, system=SYSTEM, max_tokens=4,
                                    messages=[{"role": "user", "content": "Hi"}])
        assert answer.model == httpd.MODEL and answer.usage.output_tokens >= 1
        with Client(served.daemon.socket) as client:
            assert client.status().model == httpd.MODEL  # switched back for the Anthropic turn
    finally:
        served.daemon.stop()
