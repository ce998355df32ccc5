"""The catalogue of models on this machine, and how a request's model name resolves to one.

Models are found where people already keep them: a configured models directory, the Hugging
Face hub cache, LM Studio's folders, plus the embedded default model. Only the local disk is
read (config.json files and stats), never the network, so rescanning on every call is cheap
and a model downloaded meanwhile shows up without a restart.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import errors
from .convert import DEFAULT_MODEL_NAME, ModelUnavailableError, default_gguf_path, default_model_dir
from .errors import ModelNotFoundError  # re-exported: raised by resolve()

log = logging.getLogger(__name__)

# Precedence on a name collision, and the listing order after the default model.
SOURCES = ("models-dir", "huggingface", "lmstudio", "default")
MODELS_DIR_DEPTH = 3


@dataclass(frozen=True)
class ModelEntry:
    """One model a request can name; ``ready`` is False only for the not yet converted default."""

    name: str
    path: Path
    source: str
    size_bytes: int
    quantization: str
    context_length: int
    model_type: str
    ready: bool = True


class BadModelError(errors.BadModelError, ValueError):
    """A directory that mlx-lm could not serve; the message says which and why. A ValueError
    too, for callers outside the daemon's error table (a CLI checking ``--model``)."""


class Catalog:
    """The models found on this machine, rescanned on each call (see the module docstring)."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        models_dir: Path | None = None,
        hf_cache: Path | None = None,
        lmstudio_dirs: Sequence[Path] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else None
        self.hf_cache = Path(hf_cache).expanduser() if hf_cache is not None else _default_hf_cache()
        if lmstudio_dirs is None:  # the current layout and the one before it
            home = Path.home()
            lmstudio_dirs = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
        self.lmstudio_dirs = [Path(d).expanduser() for d in lmstudio_dirs]

    def entries(self) -> list[ModelEntry]:
        """Every usable model: the default first, then by source in ``SOURCES`` order, then name."""
        found: dict[str, ModelEntry] = {}
        for entry in self._scan():
            if entry.name in found:
                kept = found[entry.name]
                log.debug("%s model %s (%s) is hidden by the %s one (%s)",
                          entry.source, entry.name, entry.path, kept.source, kept.path)
            else:
                found[entry.name] = entry
        return sorted(found.values(),
                      key=lambda e: (e.source != "default", SOURCES.index(e.source), e.name))

    def resolve(self, name_or_path: str) -> ModelEntry:
        """The entry a request means: "" is the default model, then a catalogue name, then a
        model directory given by path (so a model can be tried before it is put anywhere)."""
        if not name_or_path:
            return self.default()
        entries = self.entries()
        for entry in entries:
            if entry.name == name_or_path:
                return entry
        if _looks_like_path(name_or_path):
            path = Path(os.path.abspath(Path(name_or_path).expanduser()))
            return describe(path, name=str(path), source="path")
        raise ModelNotFoundError(_not_found_message(name_or_path, [e.name for e in entries]))

    def default(self) -> ModelEntry:
        """The embedded default model; before its first conversion it is described from the
        GGUF, since converting (seconds, and a write to the cache) is the loader's job."""
        path = default_model_dir(self.cache_dir)
        if path.is_dir():
            try:
                return describe(path, name=DEFAULT_MODEL_NAME, source="default")
            except BadModelError as exc:  # an interrupted conversion: the loader redoes it
                log.debug("the default model's directory is not usable yet: %s", exc)
        return ModelEntry(DEFAULT_MODEL_NAME, path, "default", default_gguf_path().stat().st_size,
                          quantization="", context_length=0, model_type="", ready=False)

    def _scan(self) -> Iterator[ModelEntry]:
        """Candidates in precedence order; directories mlx-lm cannot serve are left out."""
        candidates: list[tuple[str, Path, str]] = []
        if self.models_dir is not None:
            candidates += [(d.relative_to(self.models_dir).as_posix(), d, "models-dir")
                           for d in _model_dirs(self.models_dir, MODELS_DIR_DEPTH)]
        candidates += [(name, d, "huggingface") for name, d in _hf_snapshots(self.hf_cache)]
        for root in self.lmstudio_dirs:
            candidates += [(f"{d.parent.name}/{d.name}", d, "lmstudio")
                           for publisher in _subdirs(root) for d in _subdirs(publisher)]
        for name, path, source in candidates:
            try:
                yield describe(path, name=name, source=source)
            except BadModelError as exc:
                log.debug("not listing %s: %s", name, exc)
        try:
            yield self.default()
        except ModelUnavailableError as exc:
            log.debug("no default model: %s", exc)


def describe(path: Path, *, name: str, source: str) -> ModelEntry:
    """The entry for a model directory, or BadModelError saying why mlx-lm could not load it
    (checked from the files alone, without importing the architecture's module)."""
    def bad(why: str) -> BadModelError:
        return BadModelError(f"{path} is not a usable model directory: {why}")

    if not path.is_dir():
        raise bad("it is not a directory" if path.exists() else "it does not exist")
    weights = _weights(path)
    gguf = sorted(p.name for p in path.glob("*.gguf"))
    if not weights and gguf:
        raise bad(f"it holds only GGUF weights ({', '.join(gguf[:3])}), which are not an MLX "
                  "model; use an MLX conversion (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise bad("it has no config.json")
    if not weights:
        raise bad("it has no .safetensors weights")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"its config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise bad("its config.json is not a JSON object")
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise bad("its config.json has no model_type")
    if not _loadable(model_type):
        raise bad(f"model_type {model_type!r} is not one that this mlx-lm can load")
    missing = _missing_shards(path)
    if missing:
        raise bad(f"its weights are incomplete ({missing} is missing)")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    context = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    return ModelEntry(name, path, source, _size(path), _quantization(config),
                      context_length=int(context) if isinstance(context, (int, float)) else 0,
                      model_type=model_type)


def _default_hf_cache() -> Path:
    """The hub cache the huggingface_hub library itself would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # missing or unreadable: nothing found there
        return []


def _weights(path: Path) -> list[Path]:
    """The .safetensors files that can be read: a hub snapshot links to blobs that an
    interrupted download may not have written."""
    return [p for p in path.glob("*.safetensors") if p.is_file()]


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(_weights(path))


def _complete(snapshot: Path) -> bool:
    return _holds_model(snapshot) and not _missing_shards(snapshot)


def _missing_shards(path: Path) -> str | None:
    """A shard named by the weights' index but absent (a partial download), else None."""
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no index (one file), or one mlx-lm will complain about when loading
    return next((s for s in sorted(shards) if not (path / s).is_file()), None)


def _model_dirs(root: Path, depth: int) -> Iterator[Path]:
    """Model directories below ``root``; a model's own subfolders are not searched."""
    for child in _subdirs(root):
        if _holds_model(child):
            yield child
        elif depth > 1:
            yield from _model_dirs(child, depth - 1)


def _hf_snapshots(hub: Path) -> Iterator[tuple[str, Path]]:
    """(repo id, snapshot) per cached model repo: the revision of main when it is complete,
    else the newest complete snapshot (main may have moved on to a revision not downloaded)."""
    for repo in _subdirs(hub):
        if not repo.name.startswith("models--"):
            continue  # datasets--, spaces--
        repo_id = repo.name[len("models--"):].replace("--", "/", 1)
        snapshots = repo / "snapshots"
        try:
            main = snapshots / (repo / "refs" / "main").read_text().strip()
        except OSError:
            main = None
        if main is not None and main.parent == snapshots and _complete(main):
            yield repo_id, main
            continue
        complete = [s for s in _subdirs(snapshots) if _complete(s)]
        if complete:
            yield repo_id, max(complete, key=lambda s: s.stat().st_mtime)
        else:
            log.debug("no complete snapshot of %s in %s", repo_id, repo)


@functools.lru_cache(maxsize=None)
def _loadable(model_type: str) -> bool:
    """Whether mlx-lm has an architecture module for ``model_type``, found as its loader
    would (after its renaming table, where this mlx-lm has one) but without importing it."""
    remapping = getattr(importlib.import_module("mlx_lm.utils"), "MODEL_REMAPPING", {})
    module = remapping.get(model_type, model_type)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
        return False
    return importlib.util.find_spec(f"mlx_lm.models.{module}") is not None


def _size(path: Path) -> int:
    """Bytes of the directory's files, links followed (hub snapshots are links into blobs),
    each file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # a dangling link
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _quantization(config: dict) -> str:
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and "bits" in q and "group_size" in q:
            return f"{q['bits']}-bit (group {q['group_size']})"
    return str(config.get("torch_dtype") or config.get("dtype") or "")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or ("/" in text and Path(text).expanduser().exists())


def _not_found_message(asked: str, names: list[str]) -> str:
    def likeness(name: str) -> float:
        return difflib.SequenceMatcher(None, asked.lower(), name.lower()).ratio()

    closest = sorted(names, key=likeness, reverse=True)[:5]
    known = f"; closest: {', '.join(closest)}" if closest else "; the catalogue is empty"
    return f"no model named {asked!r}{known} (list them all with `mlxkv models`)"
