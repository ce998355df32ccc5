"""Many attention shapes on MLX's CUDA backend: ``python -m bench.cuda_shapes`` (on a CUDA machine).

MLX's CUDA backend caches a cuDNN attention plan per (query length, key length) shape, and by
default raises "Cache thrashing is happening" on every call once 512 shapes have missed that
cache. Every turn of a growing conversation is a new shape, so a long-running server meets
this after a few hundred turns. ``ModelRuntime`` turns the check off on CUDA (a user's own
``MLX_ENABLE_CACHE_THRASHING_CHECK`` wins). This runs ``--shapes`` forward passes of distinct
lengths on a small float16 model twice, each in a fresh process: through mlx-lm alone (MLX's
defaults) and through mlxkvd's ``ModelRuntime``, and counts the failures. Writes
``cuda_shapes.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import models


def passes(model_dir: Path, shapes: int, through_runtime: bool) -> dict:
    """``shapes`` one-pass prefills of lengths 2, 3, ... onto fresh caches; failures counted."""
    import mlx.core as mx

    if through_runtime:
        from mlxkvd.runtime import ModelRuntime, Sampling

        rt = ModelRuntime(model_dir)
        sampler = rt.sampler(Sampling())

        def one(tokens: list[int]) -> None:
            rt._sample_next(tokens, rt.make_cache(), sampler)
    else:
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = load(str(model_dir))

        def one(tokens: list[int]) -> None:
            mx.eval(model(mx.array([tokens], dtype=mx.uint32), cache=make_prompt_cache(model)))

    failures, first_failure, message = 0, None, ""
    started = time.perf_counter()
    for n in range(2, shapes + 2):
        try:
            one([(i * 7919) % 40000 + 100 for i in range(n)])
        except RuntimeError as exc:
            failures += 1
            if first_failure is None:
                first_failure, message = n - 1, str(exc)
    return {"through_runtime": through_runtime, "shapes": shapes, "failures": failures,
            "first_failure_at_shape": first_failure, "error": message[:300],
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="dir with the default model's tokenizer files")
    parser.add_argument("--shapes", type=int, default=600, help="distinct prompt lengths (MLX's limit: 512)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--child", choices=["mlx-lm", "runtime"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(passes(args.model_dir, args.shapes, args.child == "runtime")))
        return 0

    import mlx.core as mx

    if not mx.cuda.is_available():
        parser.error("no CUDA device: this checks MLX's CUDA backend")
    model_dir, _ = models.timed_build(
        Path(tempfile.gettempdir()) / "mlxkv-random-tiny-fp16", models.TINY_2L,
        args.tokenizer or models.default_tokenizer_dir(), dtype="float16")
    results = []
    for child in ("mlx-lm", "runtime"):
        run = subprocess.run([sys.executable, "-m", "bench.cuda_shapes", "--child", child, "--model-dir",
                              str(model_dir), "--shapes", str(args.shapes)], capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{child}: {r['failures']} of {r['shapes']} passes failed"
              + (f", from shape {r['first_failure_at_shape']}: {r['error']}" if r["failures"] else "")
              + f" ({r['seconds']:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_shapes.json").write_text(json.dumps(results, indent=1))
    return 0 if results[-1]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
