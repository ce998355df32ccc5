"""Bytes of KV cache per token for full-precision, 8-bit and 4-bit caches.

``python -m bench.kv_bytes [--tokens N]``: prefills the same N-token prompt on the default
model with each setting and reports allocated and used bytes per token, as the cache store
counts them (mlx-lm grows KV buffers 256 tokens at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import platformdirs

from mlxkvd import blas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_bytes.json"))
    args = parser.parse_args()
    cache_root = Path(platformdirs.user_cache_dir("mlxkv", appauthor=False))
    blas.ensure_preloaded(cache_root)

    import mlx.core as mx

    from mlxkvd.kvcache import MlxCacheOps
    from mlxkvd.runtime import Sampling, load_runtime

    ops = MlxCacheOps()
    rows = []
    for bits in (0, 8, 4):
        runtime = load_runtime(None, cache_root, kv_bits=bits)
        text = "The quick brown fox jumps over the lazy dog. " * (args.tokens // 8)
        prompt = runtime.renderer.render([{"role": "user", "content": text}]).ids[: args.tokens]
        cache = runtime.make_cache()
        # One generated token: prefill everything, then quantize (mlx-lm does it per step).
        next(runtime.generate(prompt, cache, max_tokens=1, sampling=Sampling()))
        mx.eval([c.state for c in cache])
        held = ops.num_tokens(cache)
        allocated = ops.nbytes(cache)
        rows.append(
            {
                "kv_bits": bits or "full (float32)",
                "tokens": held,
                "allocated_bytes": allocated,
                "bytes_per_token": round(allocated / held),
                "cache_type": type(cache[0]).__name__,
            }
        )
        print(f"kv_bits={bits}: {held} tokens, {allocated} bytes, {allocated / held:.0f} bytes/token",
              file=sys.stderr)
    print("| KV cache | bytes per token | MB per 1,000 tokens |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['kv_bits']} | {r['bytes_per_token']:,} | {r['bytes_per_token'] * 1000 / 1e6:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
