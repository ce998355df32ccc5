"""Random-weight mlx-lm models for the benchmarks that time per-turn work, not answers.

A model here has the default model's tokenizer and ChatML template and a llama body of any
shape with random weights: a tiny one makes the 2-core CPU behave like a GPU (new tokens are
cheap, so what a turn does per token of history shows), an 8B-shaped 4-bit one is the GPU
regime itself. Each is an ordinary mlx-lm model directory that ``mlx_lm.load``, ``mlxkvd serve
--model`` and ``mlx_lm.server --model`` all read. Building one needs no network.

``WarmCache`` is the reference such benchmarks compare against: mlx-lm in the benchmark's own
process prefilling only what a turn adds onto a warm KV cache, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

# The tokenizer and chat template travel as these files (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
SPEC_FILE = "random_weights.json"


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters of an mlx-lm llama model (``mlx_lm.models.llama.ModelArgs``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 49152  # the default model's tokenizer
    max_position_embeddings: int = 65536
    rope_theta: float = 10000.0
    head_dim: int | None = None

    def config(self) -> dict:
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": True, "rope_traditional": False,
                  "bos_token_id": 1, "eos_token_id": 2, **asdict(self)}
        if self.head_dim is None:
            del config["head_dim"]
        return config


# The CPU proxy: one layer and one attention head, because MLX's CPU attention costs about
# 0.3 s per head and layer for 300 new tokens on a 32K cache; everything else is negligible.
TINY = LlamaShape(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                  intermediate_size=128)
# A logic check of the GPU benchmark on the CPU.
TINY_2L = LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                     intermediate_size=128)
# Llama-3-8B's body with the default model's vocabulary.
LLAMA_8B = LlamaShape(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, max_position_embeddings=65536, rope_theta=500000.0)


def build_random_model(dst: Path, shape: LlamaShape, tokenizer_dir: Path, *, dtype: str = "float32",
                       bits: int | None = None, group_size: int = 64, seed: int = 0) -> Path:
    """An mlx-lm model directory at ``dst`` with random weights (normal * 0.02, norms at 1),
    ``dtype`` weights, quantized to ``bits`` if given, and ``tokenizer_dir``'s tokenizer files.

    Reused when ``dst`` already holds the same specification; otherwise written to a
    temporary sibling and renamed into place, so an interrupted build leaves nothing behind.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    tokenizer_dir = Path(tokenizer_dir)
    spec = {"shape": asdict(shape), "dtype": dtype, "bits": bits, "group_size": group_size, "seed": seed,
            "tokenizer": _digest(tokenizer_dir / "tokenizer.json")}
    if _read_json(dst / SPEC_FILE) == spec and (dst / "config.json").is_file():
        return dst
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(shape.config()))
    target = getattr(mx, dtype)
    weights = []
    for name, param in tree_flatten(model.parameters()):
        if param.ndim >= 2:  # matrices and embeddings; norms keep their ones
            param = (mx.random.normal(param.shape, dtype=target) * 0.02).astype(target)
        weights.append((name, param.astype(target)))
        mx.eval(weights[-1][1])  # one parameter at a time: no graph of all 8B values
    model.update(tree_unflatten(weights))
    del weights
    config = shape.config()
    config["torch_dtype"] = dtype
    if bits is not None:
        nn.quantize(model, group_size=group_size, bits=bits)
        config["quantization"] = {"group_size": group_size, "bits": bits}
    mx.eval(model.parameters())

    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=True)
    save_config(config, tmp / "config.json")
    copy_tokenizer(tokenizer_dir, tmp, context_length=shape.max_position_embeddings)
    (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def copy_tokenizer(src: Path, dst: Path, context_length: int | None = None) -> None:
    """Copy the tokenizer files; ``model_max_length`` set to ``context_length`` (transformers
    warns about prompts longer than it, and the default model says 8192)."""
    if not (Path(src) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {src}")
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if not path.is_file():
            continue
        if name == "tokenizer_config.json" and context_length is not None:
            config = json.loads(path.read_text())
            config["model_max_length"] = context_length
            (dst / name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy(path, dst / name)


def check_chatml(tokenizer) -> None:
    """Raise unless the tokenizer renders a conversation with ChatML markers."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    if "<|im_start|>user\nhi<|im_end|>" not in text or not text.endswith("<|im_start|>assistant\n"):
        raise RuntimeError(f"unexpected chat rendering: {text!r}")


def default_tokenizer_dir() -> Path:
    """The converted default model's directory (its tokenizer files), converted if needed."""
    from mlxkvd.convert import ensure_default_model

    from bench import common

    return ensure_default_model(common.MODEL_CACHE_DIR)


def timed_build(dst: Path, shape: LlamaShape, tokenizer_dir: Path, **kwargs) -> tuple[Path, float]:
    """``build_random_model`` and its wall time in seconds (0 when reused: nearly)."""
    started = time.perf_counter()
    path = build_random_model(dst, shape, tokenizer_dir, **kwargs)
    return path, time.perf_counter() - started


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the physical limit -----------------------------------------------------------------------


class WarmCache:
    """One conversation's KV cache held by mlx-lm in this process: the physical limit of a
    cached turn, with nothing else done per turn (no rendering, no tokenizing, no lookup).

    ``sync`` makes the cache hold given tokens, untimed (the previous turn's prompt and reply).
    ``first_token`` trims the cache to its longest common prefix with a turn's prompt, then
    times prefilling only the rest up to the first greedy token, one of two ways:

    - two passes, mlx-lm's ``generate_step`` way: the new tokens but the last in chunks,
      evaluating only the KV cache (lazy evaluation then skips the last layer's attention and
      MLP for them), then the last token through the model and its output head;
    - one pass: every new token through every layer at once, the output head on the last
      position only; a forward pass fewer (on a GPU, about a decode step's time), but the
      last layer runs for every new token.
    """

    def __init__(self, model, chunk: int = 2048):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.chunk = chunk
        self.cache = make_prompt_cache(model)
        self.held: list[int] = []

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the cache hold exactly ``tokens``: trim to the common prefix, feed the rest."""
        tokens = list(tokens)
        self._trim(common_prefix(self.held, tokens))
        self._feed(tokens[len(self.held):])

    def first_token(self, prompt: Sequence[int], *, one_pass: bool = False) -> tuple[float, int, int]:
        """Time prefilling what ``prompt`` adds to the cache up to the first token.
        Returns (seconds, tokens prefilled, the token); the cache then holds ``prompt``."""
        import mlx.core as mx

        prompt = list(prompt)
        self._trim(min(common_prefix(self.held, prompt), len(prompt) - 1))
        new = prompt[len(self.held):]
        split = len(new) - 1 if not one_pass else (len(new) - 1) // self.chunk * self.chunk
        started = time.perf_counter()
        self._feed(new[:split])
        logits = self._last_logits(mx.array(new[split:], dtype=mx.uint32)[None])
        token = int(mx.argmax(logits[0, -1, :]).item())
        elapsed = time.perf_counter() - started
        self.held.extend(new[split:])
        self._settle()
        return elapsed, len(new), token

    def cold_first_token(self, prompt: Sequence[int]) -> tuple[float, int]:
        """mlx-lm's own path from an empty cache: ``generate_step`` with its default prefill
        step, timed to the first token. Returns (seconds, the token); the cache then holds
        ``prompt`` and that token (generate_step runs one step ahead)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        if self.held:
            raise ValueError("cold_first_token needs an empty cache")
        started = time.perf_counter()
        steps = generate_step(mx.array(list(prompt), dtype=mx.uint32), self.model, max_tokens=1,
                              prompt_cache=self.cache)
        token = int(next(steps)[0])
        elapsed = time.perf_counter() - started
        for _ in steps:
            pass
        self._settle()
        self.held = list(prompt) + [token]
        if int(self.cache[0].offset) != len(self.held):
            self._trim(0)
            self.sync(list(prompt) + [token])
        return elapsed, token

    def _feed(self, tokens: list[int]) -> None:
        """Extend the cache by ``tokens`` in chunks, evaluating only the cache."""
        import mlx.core as mx

        for i in range(0, len(tokens), self.chunk):
            piece = tokens[i:i + self.chunk]
            self.model(mx.array(piece, dtype=mx.uint32)[None], cache=self.cache)
            self.held.extend(piece)
            self._settle()

    def _last_logits(self, inputs):
        """The logits of the last position only (a plain model call puts every position
        through the output head: 300 x 49152 dot products for a 300-token turn)."""
        model = self.model
        body, args = getattr(model, "model", None), getattr(model, "args", None)
        if body is None or args is None or not hasattr(body, "embed_tokens"):
            return model(inputs, cache=self.cache)  # another architecture: the plain call
        hidden = body(inputs, self.cache)[:, -1:, :]
        if getattr(args, "tie_word_embeddings", False):
            return body.embed_tokens.as_linear(hidden)
        return model.lm_head(hidden)

    def _trim(self, keep: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        if len(self.held) > keep:
            trim_prompt_cache(self.cache, len(self.held) - keep)
            del self.held[keep:]

    def _settle(self) -> None:
        import mlx.core as mx

        mx.eval([c.state for c in self.cache])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
