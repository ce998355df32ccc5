"""A draft model for the default model, made from it: no smaller model shares SmolLM2-135M's
tokenizer on this machine (and nothing is downloaded). ``layer_skip_draft`` keeps the first and
the last layers of a llama-family model (a layer-skipping self-draft) and writes them as an
mlx-lm model directory. Untrained for the job, it agrees with its target on about a third of
the tokens of a reply (24 of 30 layers): enough to exercise drafting, verification and the
draft caches, not a fast draft. Used by ``bench.speculative`` and the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

FIRST, LAST = 16, 8  # the layers kept: the first 16 and the last 8 of the default model's 30


def layer_skip_draft(model_dir: Path, out: Path, first: int = FIRST, last: int = LAST) -> Path:
    """``out``: ``model_dir``'s model with its first ``first`` and last ``last`` layers only."""
    if (out / "config.json").is_file():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    kept = list(range(first)) + list(range(layers - last, layers))
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, value in mx.load(str(path)).items():
            if name.startswith("model.layers."):
                index = int(name.split(".")[2])
                if index not in kept:
                    continue
                name = name.replace(f"model.layers.{index}.", f"model.layers.{kept.index(index)}.", 1)
            weights[name] = value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": len(kept)}, indent=2))
    return out
