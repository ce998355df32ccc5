"""The model runtime: one loaded mlx-lm model, its tokenizer and chat template.

It makes empty KV caches and runs prefill + decode against a given cache; only the engine
thread calls into the model. Its ``renderer`` (``prompt.PromptRenderer``) turns conversations
into token ids on the handler threads.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step, generation_stream, maybe_quantize_kv_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler
from mlx_lm.utils import dequantize_model

from . import fixed_shapes
from .errors import ModelChangedError, ModelLoadError
from .heads import OnePosition
from .prompt import PromptRenderer
from .reply import ToolFormat

log = logging.getLogger(__name__)

# Prompt tokens per forward pass, by backend. On a GPU each pass has a fixed cost (a kernel
# launch per layer, an attention graph per new shape): mlx-lm's 2048 keeps a turn of a few
# hundred new tokens, and most first turns, to one or two passes. On the CPU smaller chunks
# cost nothing measurable and let a cancelled turn stop sooner during a long prefill.
PREFILL_STEP_GPU = 2048
PREFILL_STEP_CPU = 512
KV_GROUP_SIZE = 64  # mlx-lm's default group size for quantized KV caches
# Below this, a temperature means greedy: 1/T of a subnormal float is infinite, and sampling
# from those logits is noise.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters for one turn."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


class SeededSampler:
    """mlx-lm's sampling (its top-p, min-p and top-k filters, in ``make_sampler``'s order, then
    a categorical draw) from a random stream of its own, seeded once: its tokens depend on the
    seed and the logits alone, not on what other turns draw meanwhile, so that a seeded turn
    gives the same reply alone and as a row of a batch. ``rewind(n)`` takes the stream back to
    where it was after ``n`` draws (a turn handed over to a batch re-draws the token that
    mlx-lm's one-step look-ahead had drawn)."""

    def __init__(self, seed: int, temp: float, top_p: float, min_p: float, top_k: int):
        self._keys = [mx.random.key(seed)]  # the key after each draw
        self._temp, self._top_p, self._min_p, self._top_k = temp, top_p, min_p, top_k

    def __call__(self, logprobs: mx.array) -> mx.array:
        if 0.0 < self._top_p < 1.0:
            logprobs = apply_top_p(logprobs, self._top_p)
        if self._min_p != 0.0:
            logprobs = apply_min_p(logprobs, self._min_p)
        if self._top_k > 0:
            logprobs = apply_top_k(logprobs, self._top_k)
        key, draw = mx.random.split(self._keys[-1])
        self._keys.append(key)
        return mx.random.categorical(logprobs * (1.0 / self._temp), key=draw)

    def rewind(self, draws: int) -> None:
        del self._keys[draws + 1 :]


def backend_name() -> str:
    """"gpu" on Metal, "cuda" on CUDA, else "cpu"."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "gpu"


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

    def __init__(
        self, model_dir: Path, *, name: str | None = None, kv_bits: int = 0, chat_template: str | None = None,
        progress: Callable[[float], None] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.kv_bits = kv_bits
        self.chat_template = chat_template  # replaces the model's own (its text)
        if not (self.model_dir / "config.json").is_file():
            raise ModelLoadError(f"{self.model_dir} is not a model directory (no config.json)")
        self.backend = backend_name()
        self.prefill_step = PREFILL_STEP_CPU if self.backend == "cpu" else PREFILL_STEP_GPU
        self.fingerprint = self._current_fingerprint()
        config = self._load(progress)
        self.context_length = int(
            config.get("max_position_embeddings")
            or getattr(self.tokenizer, "model_max_length", 0)
            or 4096
        )
        self.weights_dtype = str(self._weights_dtype()).replace("mlx.core.", "")
        self.renderer = PromptRenderer(self.tokenizer)
        # mlx-lm's tool parser for the template's call format (None: calls are plain text).
        self.tool_format = ToolFormat.of(self.tokenizer)
        # Layers other than KVCache (sliding-window, recurrent) cannot always be trimmed back to
        # a divergence; the engine keeps a checkpoint at each turn boundary for them.
        self.needs_checkpoints = not all(
            isinstance(c, (KVCache, QuantizedKVCache)) for c in self.make_cache()
        )
        self._kv_growth = self._measure_kv_growth()
        # Cached turns' passes in whole blocks of positions, whose attention plans are built
        # while idle (fixed_shapes.py): where the backend builds a plan per attention shape.
        self.fixed_shapes = self.backend == "cuda"
        self._last_span = None  # the last blocked pass's length, the likeliest next one
        self._planned: set[tuple[int, int, int]] = set()  # (start, length, allocation) warmed
        # blocked: cached turns' passes in blocks (of a planned shape); planned: warm-up
        # passes; warm_ups: warm_shapes calls that ran.
        self.shape_stats = {"blocked": 0, "planned": 0, "warm_ups": 0}

    def _current_fingerprint(self) -> str:
        fingerprint = _fingerprint(self.model_dir) + (f"-kv{self.kv_bits}" if self.kv_bits else "")
        if self.chat_template is not None:
            fingerprint += "-t" + hashlib.sha256(self.chat_template.encode()).hexdigest()[:8]
        return fingerprint

    def _load(self, progress: Callable[[float], None] | None = None) -> dict:
        started = time.monotonic()
        try:
            extra = {"chat_template": self.chat_template} if self.chat_template is not None else None
            model, self.tokenizer, config = load(
                str(self.model_dir), return_config=True, tokenizer_config=extra, lazy=True
            )
            if self.backend == "cpu":
                # MLX's CPU backend has no fast quantized matmul: float32 weights through BLAS
                # are an order of magnitude faster than 4-bit ones.
                dequantize_model(model)
                model.set_dtype(mx.float32)
            _materialize(model, progress)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model directory
            model = None
            gc.collect()
            mx.clear_cache()
            raise ModelLoadError(f"cannot load model from {self.model_dir}: {exc}") from exc
        self.model = model
        # A cached turn's one pass on a GPU: the head for its last position only (heads.py).
        # On the CPU the passes that sample feed one token (see generate): nothing to save.
        self.head = OnePosition(model, self.make_cache, shortcut=self.backend != "cpu")
        self._resident = True
        log.info(
            "model %s loaded in %.1f s: backend %s, fingerprint %s",
            self.name,
            time.monotonic() - started,
            self.backend,
            self.fingerprint,
        )
        return config

    @property
    def loaded(self) -> bool:
        """Whether the weights are resident; False only once their memory has been returned."""
        return self._resident

    def unload(self) -> None:
        """Let the weights leave memory (idle unload); ``ensure_loaded`` brings them back.
        The tokenizer stays: it is small, and the status and conversation RPCs use it."""
        if self.model is None:
            return
        self.model = self.head = None
        gc.collect()
        mx.clear_cache()
        _return_free_memory()
        self._resident = False
        log.info("model %s unloaded", self.name)

    def ensure_loaded(self) -> None:
        """Load the weights again after ``unload``, from the same directory. Raises
        ``ModelChangedError`` if its files changed since the daemon started: the caches were
        made with the old ones."""
        if self.model is not None:
            return
        if self._current_fingerprint() != self.fingerprint:
            raise ModelChangedError(
                f"the files of model {self.name} in {self.model_dir} changed since the daemon "
                "started; restart it to serve the new model"
            )
        self._load()

    def _measure_kv_growth(self) -> list[tuple[int, int, int | None]]:
        """Per layer ``(bytes per step, step, token cap)``. One forward pass of one token
        into an empty cache allocates one step of each growing layer (256 tokens for KVCache);
        a sliding-window layer stops growing at its window (plus one prefill chunk), and a
        recurrent layer's state has a fixed size (step None)."""
        cache = self.make_cache()
        self.model(mx.array([[0]], dtype=mx.uint32), cache=cache)
        if self.kv_bits:
            maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, self.kv_bits)
        mx.eval([c.state for c in cache])
        growth = []
        for c in cache:
            if isinstance(c, RotatingKVCache):
                growth.append((c.nbytes, c.step, c.max_size + self.prefill_step))
            elif isinstance(c, (KVCache, QuantizedKVCache)):
                growth.append((c.nbytes, c.step, None))
            else:
                growth.append((c.nbytes, None, None))
        return growth

    def kv_nbytes(self, num_tokens: int) -> int:
        """An upper bound of the bytes a cache of this model allocates while it holds up to
        ``num_tokens`` tokens (what the memory budget reserves for a turn in flight)."""
        total = 0
        for nbytes, step, cap in self._kv_growth:
            if step is None:
                total += nbytes
            else:
                n = min(num_tokens, cap) if cap is not None else num_tokens
                total += nbytes * max(1, math.ceil(n / step))
        return total

    def _weights_dtype(self):
        from mlx.utils import tree_flatten

        for _, value in tree_flatten(self.model.parameters()):
            if mx.issubdtype(value.dtype, mx.floating):
                return value.dtype
        return "unknown"

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def make_cache(self) -> list:
        """An empty KV cache for this model."""
        return make_prompt_cache(self.model)

    def prefill(self, tokens: Sequence[int], cache: list, cancelled=None) -> int:
        """Feed ``tokens`` to the model, extending ``cache``, without sampling anything.
        Returns how many were fed: all of them, unless ``cancelled`` (a ``threading.Event``,
        checked between chunks) was set.
        """
        tokens = list(tokens)
        step = self.prefill_step
        for start in range(0, len(tokens), step):
            if cancelled is not None and cancelled.is_set():
                return start
            chunk = mx.array([tokens[start : start + step]], dtype=mx.uint32)
            with mx.stream(generation_stream):  # the stream generate_step runs on
                self.model(chunk, cache=cache)
                if self.kv_bits:
                    maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, self.kv_bits)
                mx.eval([c.state for c in cache])
        return len(tokens)

    def generate(
        self,
        new_tokens: Sequence[int],
        cache: list,
        *,
        max_tokens: int,
        sampler,
    ) -> Iterator[int]:
        """Feed ``new_tokens`` (at most ``prefill_step`` of them) to the model, extending
        ``cache``, and yield generated token ids.

        The first token comes from one evaluation, never two with a synchronisation between
        (as mlx-lm's ``generate_step`` does). On the CPU: all but the last new token, then the
        last one, built lazily, so the output head runs for the last position only (for a
        few hundred positions it would cost more than the layers) and the passes are the
        reference's. On a GPU, where every pass pays a launch per layer and a new attention
        shape: one pass over all of them, the head for the last one only (heads.py). Later
        tokens come from
        ``generate_step``. The cache holds the prompt plus every token yielded so far, however
        the caller stops; a caller that stops at the first token must close the generator
        (``contextlib.closing``), which feeds it then, as the end of a one-token reply does.
        ``sampler``: the turn's own (``sampler``; a seeded one carries its random stream).
        """
        first = self._sample_next(new_tokens, cache, sampler)
        fed = False
        try:
            yield first
            if max_tokens > 1:
                kv = {"kv_bits": self.kv_bits, "quantized_kv_start": 0} if self.kv_bits else {}
                for token, _ in generate_step(
                    mx.array([first], dtype=mx.uint32),
                    self.model,
                    max_tokens=max_tokens - 1,
                    sampler=sampler,
                    prompt_cache=cache,
                    **kv,
                ):
                    fed = True  # generate_step has fed ``first`` before its first token
                    yield int(token)
        except GeneratorExit:
            if not fed:
                self._sample_next([first], cache, None)
            raise
        if not fed:  # a one-token reply
            self._sample_next([first], cache, None)

    @staticmethod
    def sampler(sampling: Sampling):
        """mlx-lm's sampler for these parameters (greedy below ``MIN_TEMPERATURE``); a seeded
        one is a ``SeededSampler``."""
        temp = sampling.temperature if sampling.temperature >= MIN_TEMPERATURE else 0.0
        top_p = sampling.top_p if sampling.top_p < 1.0 else 0.0
        if sampling.seed is not None and temp > 0.0:
            return SeededSampler(sampling.seed, temp, top_p, sampling.min_p, sampling.top_k)
        return make_sampler(temp=temp, top_p=top_p, min_p=sampling.min_p, top_k=sampling.top_k)

    @property
    def can_batch(self) -> bool:
        """Whether this model's caches can be rows of mlx-lm's batch generator (plain
        KVCache layers, not quantized)."""
        return not self.kv_bits and all(type(c) is KVCache for c in self.make_cache())

    def _blocks_apply(self, cache: list) -> bool:
        """Whether passes onto ``cache`` run in blocks (fixed_shapes.py): on, and a cache of
        plain KVCache layers (a quantized one takes mlx-lm's own quantizing steps)."""
        return self.fixed_shapes and not self.kv_bits and fixed_shapes.applies(cache)

    def warm_shapes(self, cache: list, stop: Callable[[], bool]) -> int:
        """Build the attention plans of the next turn's likely shapes onto ``cache`` (read, not
        changed), while ``stop()`` is false; see fixed_shapes.py. Returns the passes run."""
        if not self._blocks_apply(cache):
            return 0
        allocation = fixed_shapes.allocated(cache)
        spans = fixed_shapes.likely_spans(cache[0].offset, allocation, self._last_span)
        started = time.perf_counter()
        with mx.stream(generation_stream):
            ran = fixed_shapes.warm(self.model, cache, spans, stop)
        self._planned = {(start, length, allocation) for start, length in spans[:ran]}
        self.shape_stats["planned"] += ran
        self.shape_stats["warm_ups"] += 1
        log.debug("planned %d of %d likely shapes in %.0f ms", ran, len(spans), (time.perf_counter() - started) * 1e3)
        return ran

    def _blocked_logits(self, tokens: list[int], cache: list):
        """The last token's logits from a blocked pass (fixed_shapes.py) whose shape an idle
        warm-up planned, or None: a pass of an unplanned shape runs plainly (blocks would only
        add their padding to its plan's cost)."""
        if not tokens or not self._blocks_apply(cache):
            return None
        blocked = fixed_shapes.span(cache[0].offset, len(tokens))
        if blocked is None:
            return None
        self._last_span = blocked[1]
        if (*blocked, fixed_shapes.allocated(cache)) not in self._planned:
            return None
        self.shape_stats["blocked"] += 1
        return fixed_shapes.forward(self.head, tokens, cache)

    def _sample_next(self, tokens: Sequence[int], cache: list, sampler) -> int:
        """One forward pass of ``tokens`` onto ``cache``; the next token sampled from its last
        position (None: only feed them)."""
        tokens = list(tokens)
        with mx.stream(generation_stream):  # the stream generate_step runs on
            logits = self._blocked_logits(tokens, cache) if sampler is not None else None
            if logits is not None:
                token = sampler(logits - mx.logsumexp(logits, keepdims=True))
                mx.eval(token, [c.state for c in cache])
                return int(token.item())
            if len(tokens) > 1 and sampler is not None and self.backend == "cpu":
                # Lazy: its logits are never evaluated, so the head never runs for these.
                self.model(mx.array([tokens[:-1]], dtype=mx.uint32), cache=cache)
                if self.kv_bits:
                    maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, self.kv_bits)
                tokens = tokens[-1:]
            started = time.perf_counter()
            inputs = mx.array([tokens], dtype=mx.uint32)
            # Without a sampler the logits are never evaluated: the head does not run.
            logits = self.head.logits(inputs, cache) if sampler is not None else self.model(inputs, cache=cache)
            if self.kv_bits:
                maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, self.kv_bits)
            if sampler is None:
                mx.eval([c.state for c in cache])
                return -1
            token = sampler(logits - mx.logsumexp(logits, keepdims=True))
            built = time.perf_counter()
            mx.eval(token, [c.state for c in cache])
            if len(tokens) > 1 and log.isEnabledFor(logging.DEBUG):
                log.debug("a pass of %d tokens onto %d: built in %.1f ms, evaluated in %.1f ms", len(tokens),
                          cache[0].offset - len(tokens), (built - started) * 1e3, (time.perf_counter() - built) * 1e3)
        return int(token.item())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dir": str(self.model_dir),
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "weights_dtype": self.weights_dtype,
            "context_length": self.context_length,
            "prefill_step": self.prefill_step,
        }


# Parts of the weights read per progress report.
_LOAD_STEPS = 50


def _materialize(model: Any, progress: Callable[[float], None] | None) -> None:
    """Read a lazily loaded model's weights, in about ``_LOAD_STEPS`` parts by bytes, calling
    ``progress`` with the fraction read after each (a large model takes tens of seconds)."""
    from mlx.utils import tree_flatten

    params = [v for _, v in tree_flatten(model.parameters())]
    total = sum(v.nbytes for v in params) or 1
    part, done, group = total / _LOAD_STEPS, 0, []
    for i, value in enumerate(params):
        group.append(value)
        done += value.nbytes
        if sum(v.nbytes for v in group) >= part or i == len(params) - 1:
            mx.eval(group)
            group = []
            if progress is not None:
                progress(done / total)


def _return_free_memory() -> None:
    """Give the allocator's free pages back to the system (glibc): freed weights that sit below
    live small objects in the heap would otherwise stay in the process's resident memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_runtime(
    model_dir: Path | None, cache_dir: Path, *, kv_bits: int = 0, chat_template: str | None = None
) -> ModelRuntime:
    """The runtime for ``--model DIR``, or for the embedded default model when None;
    ``chat_template``: ``--chat-template``, a bundled template's name or a file."""
    template = read_chat_template(chat_template) if chat_template else None
    if model_dir is None:
        from .convert import DEFAULT_MODEL_NAME, ensure_default_model

        return ModelRuntime(ensure_default_model(cache_dir), name=DEFAULT_MODEL_NAME, kv_bits=kv_bits,
                            chat_template=template)
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    return ModelRuntime(Path(model_dir), kv_bits=kv_bits, chat_template=template)


TEMPLATES_DIR = Path(__file__).parent / "templates"


def bundled_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def read_chat_template(name_or_path: str) -> str:
    """A bundled template by name (``chatml-tools``), else a Jinja file's text."""
    bundled = TEMPLATES_DIR / f"{name_or_path}.jinja"
    path = bundled if "/" not in name_or_path and bundled.is_file() else Path(name_or_path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"cannot read chat template {name_or_path!r} (a file, or one of: "
            f"{', '.join(bundled_templates())}): {exc}"
        ) from None
