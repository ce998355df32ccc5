"""The model runtime: one loaded mlx-lm model, its tokenizer and chat template.

It renders conversations into token ids, makes empty KV caches and runs prefill + decode
against a given cache. Only the engine thread calls into it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import dequantize_model

from .errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters for one turn."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


def backend_name() -> str:
    """"gpu" on Metal, "cuda" on CUDA, else "cpu"."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "gpu"


def _template_tools(tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tool definitions in the shape Hugging Face chat templates expect."""
    return [{"type": "function", "function": t} for t in tools] if tools else None


def _fingerprint(model_dir: Path) -> str:
    """Identity of weights, tokenizer and chat template: caches made with one never fit another."""
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".json" or path.suffix == ".jinja":
            h.update(path.name.encode())
            h.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class ModelRuntime:
    """One resident model. Cheap queries are thread-safe; generation is engine-thread only."""

    def __init__(self, model_dir: Path, *, name: str | None = None, kv_bits: int = 0):
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.kv_bits = kv_bits
        if not (self.model_dir / "config.json").is_file():
            raise ModelLoadError(f"{self.model_dir} is not a model directory (no config.json)")
        started = time.monotonic()
        try:
            self.model, self.tokenizer, config = load(str(self.model_dir), return_config=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model directory
            raise ModelLoadError(f"cannot load model from {self.model_dir}: {exc}") from exc
        self.backend = backend_name()
        if self.backend == "cpu":
            # MLX's CPU backend has no fast quantized matmul: float32 weights through BLAS
            # are an order of magnitude faster than 4-bit ones.
            dequantize_model(self.model)
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())
        self.weights_dtype = str(self._weights_dtype()).replace("mlx.core.", "")
        self.context_length = int(
            config.get("max_position_embeddings")
            or getattr(self.tokenizer, "model_max_length", 0)
            or 4096
        )
        self.fingerprint = _fingerprint(self.model_dir) + (f"-kv{kv_bits}" if kv_bits else "")
        log.info(
            "model %s loaded in %.1f s: backend %s, weights %s, context %d, fingerprint %s",
            self.name,
            time.monotonic() - started,
            self.backend,
            self.weights_dtype,
            self.context_length,
            self.fingerprint,
        )

    def _weights_dtype(self):
        from mlx.utils import tree_flatten

        for _, value in tree_flatten(self.model.parameters()):
            if mx.issubdtype(value.dtype, mx.floating):
                return value.dtype
        return "unknown"

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the conversation rendered by the chat template, ready to generate."""
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    list(messages),
                    tools=_template_tools(tools),
                    add_generation_prompt=True,
                )
            )
        except Exception as exc:  # jinja2 raises TemplateError for roles a template refuses
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc

    def message_index_of_token(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        token_index: int,
    ) -> int:
        """Index of the message whose rendering contains token ``token_index``."""
        for i in range(1, len(messages) + 1):
            try:
                n = len(self.tokenizer.apply_chat_template(
                    list(messages[:i]),
                    tools=_template_tools(tools),
                    add_generation_prompt=False,
                ))
            except Exception:  # noqa: BLE001 - a partial history a template refuses
                continue
            if n > token_index:
                return i - 1
        return len(messages) - 1

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def make_cache(self) -> list:
        """An empty KV cache for this model."""
        return make_prompt_cache(self.model)

    def generate(
        self,
        new_tokens: Sequence[int],
        cache: list,
        *,
        max_tokens: int,
        sampling: Sampling,
    ) -> Iterator[int]:
        """Prefill ``new_tokens`` onto ``cache`` and yield generated token ids.

        When a token is yielded it has already been fed to the model, so the cache always
        holds the prompt plus every token yielded so far, however the caller stops.
        """
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(
            temp=sampling.temperature,
            top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0,
            min_p=sampling.min_p,
            top_k=sampling.top_k,
        )
        kv = {"kv_bits": self.kv_bits, "quantized_kv_start": 0} if self.kv_bits else {}
        for token, _ in generate_step(
            mx.array(list(new_tokens), dtype=mx.uint32),
            self.model,
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=cache,
            **kv,
        ):
            yield int(token)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dir": str(self.model_dir),
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "weights_dtype": self.weights_dtype,
            "context_length": self.context_length,
        }


def load_runtime(model_dir: Path | None, cache_dir: Path, *, kv_bits: int = 0) -> ModelRuntime:
    """The runtime for ``--model DIR``, or for the embedded default model when None."""
    if model_dir is None:
        from .convert import DEFAULT_MODEL_NAME, ensure_default_model

        return ModelRuntime(ensure_default_model(cache_dir), name=DEFAULT_MODEL_NAME, kv_bits=kv_bits)
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    return ModelRuntime(Path(model_dir), kv_bits=kv_bits)
