"""The model catalogue: real directories on disk in each source's layout, no model loaded."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import grpc
import pytest

from mlxkvd.catalog import BadModelError, Catalog, ModelEntry, ModelNotFoundError
from mlxkvd.convert import DEFAULT_MODEL_NAME, default_gguf_path, default_model_dir, ensure_default_model
from mlxkvd.errors import status_code

WEIGHTS = 1000  # bytes of each fake model.safetensors


def config(**overrides) -> dict:
    return {"model_type": "llama", "max_position_embeddings": 2048,
            "quantization": {"group_size": 64, "bits": 4}, **overrides}


def make_model(path: Path, weights: int = WEIGHTS, **overrides) -> Path:
    """A model directory as mlx-lm reads it: config.json, weights and a tokenizer file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config(**overrides)))
    (path / "model.safetensors").write_bytes(b"\0" * weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def make_hf_snapshot(hub: Path, repo: str, revision: str, weights: int = WEIGHTS, **overrides) -> Path:
    """A hub cache snapshot: its files are relative links into the repo's blobs/."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    files = {"config.json": json.dumps(config(**overrides)).encode(), "model.safetensors": b"\0" * weights}
    for name, data in files.items():
        (repo_dir / "blobs" / f"{revision}-{name}").write_bytes(data)
        os.symlink(f"../../blobs/{revision}-{name}", snapshot / name)
    return snapshot


def set_main(hub: Path, repo: str, revision: str) -> None:
    refs = hub / ("models--" + repo.replace("/", "--")) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(revision)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def catalog(tmp_path: Path, **kwargs) -> Catalog:
    """A catalogue that sees only tmp_path: the default model is not converted in its cache."""
    kwargs.setdefault("hf_cache", tmp_path / "hub")
    kwargs.setdefault("lmstudio_dirs", [])
    return Catalog(cache_dir=tmp_path / "cache", **kwargs)


def by_name(cat: Catalog) -> dict[str, ModelEntry]:
    return {e.name: e for e in cat.entries()}


# --- sources -------------------------------------------------------------------------------


def test_models_dir_names_nested_models_by_relative_path(tmp_path):
    models = tmp_path / "models"
    make_model(models / "tiny")
    make_model(models / "org" / "small")
    make_model(models / "a" / "b" / "deep")
    make_model(models / "a" / "b" / "c" / "too-deep")  # four levels down
    (models / "notes").mkdir()
    (models / "notes" / "readme.txt").write_text("not a model")

    entries = by_name(catalog(tmp_path, models_dir=models))

    local = {n: e for n, e in entries.items() if e.source == "models-dir"}
    assert sorted(local) == ["a/b/deep", "org/small", "tiny"]
    assert local["org/small"].path == models / "org" / "small"
    assert local["tiny"].size_bytes == dir_bytes(models / "tiny")
    assert local["tiny"].context_length == 2048
    assert local["tiny"].model_type == "llama"
    assert local["tiny"].ready


def test_models_dir_leaves_out_models_mlx_lm_cannot_load(tmp_path, caplog):
    models = tmp_path / "models"
    make_model(models / "good")
    make_model(models / "alien", model_type="not_an_architecture")
    broken = make_model(models / "broken")
    (broken / "config.json").write_text("{not json")

    with caplog.at_level(logging.DEBUG, logger="mlxkvd.catalog"):
        names = [e.name for e in catalog(tmp_path, models_dir=models).entries()]

    assert "good" in names
    assert "alien" not in names and "broken" not in names
    assert "not_an_architecture" in caplog.text


def test_model_type_renamed_by_mlx_lm_is_loadable(tmp_path):
    # mlx-lm has no mistral module: it loads "mistral" as llama (its MODEL_REMAPPING).
    make_model(tmp_path / "models" / "mistral", model_type="mistral")
    entry = catalog(tmp_path, models_dir=tmp_path / "models").resolve("mistral")
    assert entry.model_type == "mistral"


def test_huggingface_takes_the_revision_of_main(tmp_path):
    hub = tmp_path / "hub"
    main = make_hf_snapshot(hub, "mlx-community/Qwen3-0.6B-4bit", "aaa111", weights=3000,
                            max_position_embeddings=40960)
    other = make_hf_snapshot(hub, "mlx-community/Qwen3-0.6B-4bit", "bbb222", max_position_embeddings=512)
    age(main, 3600)  # the other snapshot is newer, but main names this one
    set_main(hub, "mlx-community/Qwen3-0.6B-4bit", "aaa111")

    entry = by_name(catalog(tmp_path))["mlx-community/Qwen3-0.6B-4bit"]

    assert entry.source == "huggingface"
    assert entry.path == main and entry.path != other
    assert entry.context_length == 40960
    # The snapshot's files are links; the size is that of the blobs they point to.
    blob_bytes = len(json.dumps(config(max_position_embeddings=40960))) + 3000
    assert entry.size_bytes == blob_bytes
    assert entry.size_bytes > sum(p.lstat().st_size for p in main.iterdir())


def test_huggingface_falls_back_to_the_newest_complete_snapshot(tmp_path):
    hub = tmp_path / "hub"
    repo = "org/model"
    old = make_hf_snapshot(hub, repo, "old", max_position_embeddings=100)
    new = make_hf_snapshot(hub, repo, "new", max_position_embeddings=200)
    partial = make_hf_snapshot(hub, repo, "partial", max_position_embeddings=300)
    (hub / "models--org--model" / "blobs" / "partial-model.safetensors").unlink()  # download cut off
    age(old, 7200)
    age(new, 3600)
    set_main(hub, repo, "partial")

    entry = by_name(catalog(tmp_path))[repo]

    assert entry.path == new
    assert entry.path not in (old, partial)


def test_huggingface_without_refs_takes_the_newest_snapshot(tmp_path):
    hub = tmp_path / "hub"
    old = make_hf_snapshot(hub, "org/model", "old")
    new = make_hf_snapshot(hub, "org/model", "new")
    age(old, 3600)
    assert by_name(catalog(tmp_path))["org/model"].path == new


def test_huggingface_snapshot_missing_a_shard_is_incomplete(tmp_path):
    hub = tmp_path / "hub"
    whole = make_hf_snapshot(hub, "org/sharded", "whole")
    cut = make_hf_snapshot(hub, "org/sharded", "cut")
    index = {"weight_map": {"a.weight": "model.safetensors", "b.weight": "model-00002.safetensors"}}
    (cut / "model.safetensors.index.json").write_text(json.dumps(index))
    age(whole, 3600)
    set_main(hub, "org/sharded", "cut")
    assert by_name(catalog(tmp_path))["org/sharded"].path == whole


def test_huggingface_repo_ids(tmp_path):
    hub = tmp_path / "hub"
    make_hf_snapshot(hub, "org/name--with--dashes", "r1")
    make_hf_snapshot(hub, "gpt2", "r1")
    make_model(hub / "datasets--org--data" / "snapshots" / "r1")  # not a model repo
    names = {e.name for e in catalog(tmp_path).entries() if e.source == "huggingface"}
    assert names == {"org/name--with--dashes", "gpt2"}


def test_lmstudio_lists_mlx_models_and_skips_gguf_ones(tmp_path, caplog):
    lms = tmp_path / "lmstudio"
    make_model(lms / "mlx-community" / "Llama-3.2-1B-Instruct-4bit")
    gguf = lms / "lmstudio-community" / "Qwen3-8B-GGUF"
    gguf.mkdir(parents=True)
    (gguf / "Qwen3-8B-Q4_K_M.gguf").write_bytes(b"GGUF")
    (lms / "stray-file.txt").write_text("")

    with caplog.at_level(logging.DEBUG, logger="mlxkvd.catalog"):
        entries = [e for e in catalog(tmp_path, lmstudio_dirs=[lms]).entries() if e.source == "lmstudio"]

    assert [e.name for e in entries] == ["mlx-community/Llama-3.2-1B-Instruct-4bit"]
    assert "GGUF" in caplog.text


def test_default_locations_come_from_the_environment_and_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    make_hf_snapshot(home / ".cache" / "huggingface" / "hub", "org/in-home-hub", "r1")
    make_model(home / ".lmstudio" / "models" / "pub" / "new-layout")
    make_model(home / ".cache" / "lm-studio" / "models" / "pub" / "old-layout")
    make_hf_snapshot(tmp_path / "hf-home" / "hub", "org/in-hf-home", "r1")
    make_hf_snapshot(tmp_path / "hub-cache", "org/in-hub-cache", "r1")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)

    def names() -> set[str]:
        return {e.name for e in Catalog(cache_dir=tmp_path / "cache").entries()}

    assert {"org/in-home-hub", "pub/new-layout", "pub/old-layout"} <= names()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert "org/in-hf-home" in names() and "org/in-home-hub" not in names()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert "org/in-hub-cache" in names() and "org/in-hf-home" not in names()


def test_earlier_source_wins_a_name_collision(tmp_path, caplog):
    models, hub, lms = tmp_path / "models", tmp_path / "hub", tmp_path / "lms"
    make_model(models / "org" / "both", max_position_embeddings=1)
    make_hf_snapshot(hub, "org/both", "r1", max_position_embeddings=2)
    make_hf_snapshot(hub, "org/hub-and-lms", "r1", max_position_embeddings=2)
    make_model(lms / "org" / "both", max_position_embeddings=3)
    make_model(lms / "org" / "hub-and-lms", max_position_embeddings=3)

    with caplog.at_level(logging.DEBUG, logger="mlxkvd.catalog"):
        entries = catalog(tmp_path, models_dir=models, lmstudio_dirs=[lms]).entries()

    names = [e.name for e in entries]
    assert names.count("org/both") == 1 and names.count("org/hub-and-lms") == 1
    found = {e.name: e for e in entries}
    assert (found["org/both"].source, found["org/both"].context_length) == ("models-dir", 1)
    assert (found["org/hub-and-lms"].source, found["org/hub-and-lms"].context_length) == ("huggingface", 2)
    assert "hidden" in caplog.text and str(lms / "org" / "both") in caplog.text


def test_entries_are_ordered_default_then_source_then_name(tmp_path):
    models, hub, lms = tmp_path / "models", tmp_path / "hub", tmp_path / "lms"
    make_model(lms / "a" / "first-by-name")
    make_hf_snapshot(hub, "z/last-by-name", "r1")
    make_hf_snapshot(hub, "b/model", "r1")
    make_model(models / "zz")
    make_model(models / "aa")

    entries = catalog(tmp_path, models_dir=models, lmstudio_dirs=[lms]).entries()

    assert [(e.source, e.name) for e in entries] == [
        ("default", DEFAULT_MODEL_NAME),
        ("models-dir", "aa"), ("models-dir", "zz"),
        ("huggingface", "b/model"), ("huggingface", "z/last-by-name"),
        ("lmstudio", "a/first-by-name"),
    ]


def test_entries_are_rescanned_on_each_call(tmp_path):
    cat = catalog(tmp_path, models_dir=tmp_path / "models")
    assert "later" not in by_name(cat)
    make_model(tmp_path / "models" / "later")
    assert "later" in by_name(cat)


@pytest.mark.parametrize("overrides, expected", [
    ({}, "4-bit (group 64)"),
    ({"quantization": None, "quantization_config": {"bits": 8, "group_size": 32}}, "8-bit (group 32)"),
    ({"quantization": None, "torch_dtype": "bfloat16"}, "bfloat16"),
    ({"quantization": None, "dtype": "float16"}, "float16"),
    ({"quantization": None, "quantization_config": {"quant_method": "fp8"}, "torch_dtype": "float32"},
     "float32"),
    ({"quantization": None}, ""),
])
def test_quantization(tmp_path, overrides, expected):
    make_model(tmp_path / "models" / "m", **overrides)
    assert catalog(tmp_path, models_dir=tmp_path / "models").resolve("m").quantization == expected


def test_context_length_of_a_multimodal_config_and_of_none(tmp_path):
    make_model(tmp_path / "models" / "vl", max_position_embeddings=None,
               text_config={"max_position_embeddings": 32768})
    make_model(tmp_path / "models" / "unknown", max_position_embeddings=None)
    found = by_name(catalog(tmp_path, models_dir=tmp_path / "models"))
    assert found["vl"].context_length == 32768
    assert found["unknown"].context_length == 0


# --- resolve -------------------------------------------------------------------------------


def test_resolve_by_name(tmp_path):
    make_model(tmp_path / "models" / "org" / "m")
    make_hf_snapshot(tmp_path / "hub", "mlx-community/x", "r1")
    cat = catalog(tmp_path, models_dir=tmp_path / "models")
    assert cat.resolve("org/m").path == tmp_path / "models" / "org" / "m"
    assert cat.resolve("mlx-community/x").source == "huggingface"


def test_resolve_empty_is_the_default(tmp_path):
    entry = catalog(tmp_path).resolve("")
    assert entry == catalog(tmp_path).default()
    assert (entry.name, entry.source) == (DEFAULT_MODEL_NAME, "default")


def test_resolve_by_path(tmp_path, monkeypatch):
    model = make_model(tmp_path / "elsewhere" / "my-model", max_position_embeddings=777)
    cat = catalog(tmp_path)

    entry = cat.resolve(str(model))
    assert (entry.name, entry.path, entry.source) == (str(model), model, "path")
    assert entry.context_length == 777 and entry.size_bytes == dir_bytes(model)

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cat.resolve("./my-model").name == str(model)
    assert cat.resolve("my-model/").path == model  # has a "/" and exists
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cat.resolve("~/elsewhere/my-model").name == str(model)


def test_resolve_unknown_name_suggests_close_ones(tmp_path):
    make_model(tmp_path / "models" / "qwen3-0.6b-4bit")
    make_model(tmp_path / "models" / "llama-3.2-1b")
    cat = catalog(tmp_path, models_dir=tmp_path / "models")

    with pytest.raises(ModelNotFoundError) as info:
        cat.resolve("qwen3-0.6b")

    message = str(info.value)
    assert "'qwen3-0.6b'" in message
    assert message.index("qwen3-0.6b-4bit") < message.index("llama-3.2-1b")
    assert "mlxkv models" in message
    assert isinstance(info.value, LookupError)
    assert status_code(info.value) == grpc.StatusCode.NOT_FOUND
    # A repo-like name that is neither listed nor on disk is not taken for a path.
    with pytest.raises(ModelNotFoundError):
        cat.resolve("mlx-community/not-downloaded")


def bad_model_message(tmp_path: Path, path: Path) -> str:
    with pytest.raises(BadModelError) as info:
        catalog(tmp_path).resolve(str(path))
    assert isinstance(info.value, ValueError)
    assert status_code(info.value) == grpc.StatusCode.INVALID_ARGUMENT  # the request's fault
    assert str(path) in str(info.value)
    return str(info.value)


def test_bad_model_missing_directory(tmp_path):
    assert "does not exist" in bad_model_message(tmp_path, tmp_path / "nowhere")


def test_bad_model_without_config(tmp_path):
    model = make_model(tmp_path / "m")
    (model / "config.json").unlink()
    assert "no config.json" in bad_model_message(tmp_path, model)


def test_bad_model_without_safetensors(tmp_path):
    model = make_model(tmp_path / "m")
    (model / "model.safetensors").unlink()
    assert "no .safetensors" in bad_model_message(tmp_path, model)


def test_bad_model_gguf_only(tmp_path):
    model = tmp_path / "gguf"
    model.mkdir()
    (model / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    message = bad_model_message(tmp_path, model)
    assert "GGUF" in message and "model-Q4_K_M.gguf" in message


def test_bad_model_unknown_model_type(tmp_path):
    model = make_model(tmp_path / "m", model_type="not_an_architecture")
    assert "'not_an_architecture'" in bad_model_message(tmp_path, model)


def test_bad_model_missing_shard(tmp_path):
    model = make_model(tmp_path / "m")
    index = {"weight_map": {"a.weight": "model.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    message = bad_model_message(tmp_path, model)
    assert "incomplete" in message and "model-00002-of-00002.safetensors" in message


def test_bad_model_path_that_does_not_exist_yet_is_a_path_not_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for asked in ("./typo", "~/typo", "/no/such/dir"):
        with pytest.raises(BadModelError, match="does not exist"):
            catalog(tmp_path).resolve(asked)


def test_bad_model_broken_json(tmp_path):
    model = make_model(tmp_path / "m")
    (model / "config.json").write_text('{"model_type": "llama",')
    assert "not valid JSON" in bad_model_message(tmp_path, model)


# --- the default model ---------------------------------------------------------------------


def test_default_not_converted_yet_is_described_from_the_gguf(tmp_path):
    cache = tmp_path / "cache"
    entry = catalog(tmp_path).default()

    assert entry.name == DEFAULT_MODEL_NAME and entry.source == "default"
    assert entry.path == default_model_dir(cache)
    assert entry.path.is_relative_to(cache)
    assert not entry.ready and not entry.path.exists()  # nothing was converted
    assert entry.size_bytes == default_gguf_path().stat().st_size
    assert catalog(tmp_path).entries()[0] == entry


def test_default_converted_is_ready(tmp_path):
    cache = tmp_path / "cache"
    converted = make_model(default_model_dir(cache), max_position_embeddings=8192,
                           quantization={"group_size": 32, "bits": 4})

    entry = catalog(tmp_path).default()

    assert entry.ready and entry.path == converted
    assert (entry.quantization, entry.context_length, entry.model_type) == ("4-bit (group 32)", 8192, "llama")
    assert entry.size_bytes == dir_bytes(converted)
    # ensure_default_model finds the same directory and does not convert again.
    assert ensure_default_model(cache) == converted
    assert (converted / "model.safetensors").stat().st_size == WEIGHTS
