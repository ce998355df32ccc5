"""One batched decode step, in process: ``python -m bench.batch_step --model DIR``.

Times the model's forward pass of one token per row at batch sizes 1, 2, 4 and 8 (``--rows``),
each row's cache holding ``--context`` tokens, as mlx-lm's batch generator runs it (a
``BatchKVCache``). What batching can give on a backend: if a step of 8 rows costs about one
row's, aggregate decode grows with the rows; if it costs 8 times as much, batching cannot beat
one turn at a time. Where the cost comes from, per row count: the same step on plain ``KVCache``
layers (no padding mask: the batch cache's own cost is the difference), and one of the model's
projections (the first layer's MLP gate, ``hidden x intermediate``) alone. Prints a table and
writes ``batch_step.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import common


def step_seconds(model, rows: int, context: int, repeats: int, batch_cache: bool = True) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    layers = len(model.layers)
    cache = [BatchKVCache(left_padding=[0] * rows) if batch_cache else KVCache() for _ in range(layers)]
    prompt = mx.zeros((rows, context), dtype=mx.uint32)
    mx.eval(model(prompt, cache=cache))
    token = mx.zeros((rows, 1), dtype=mx.uint32)
    times = []
    for _ in range(repeats + 2):  # the first two: kernels compiled at first sight, not timed
        started = time.perf_counter()
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1:, :], axis=-1).astype(mx.uint32)
        mx.eval(token)
        times.append(time.perf_counter() - started)
        for c in cache:
            c.trim(1)
    return statistics.median(times[2:])


def projection_seconds(model, rows: int, repeats: int) -> float:
    """One token per row through the first layer's MLP gate projection (quantized or not)."""
    import mlx.core as mx

    layer = model.layers[0].mlp.gate_proj
    x = mx.random.normal((rows, 1, model.args.hidden_size)).astype(model.layers[0].input_layernorm.weight.dtype)
    for _ in range(3):  # compiled at first sight, not timed
        mx.eval(layer(x))
    started = time.perf_counter()
    for _ in range(repeats * 5):
        mx.eval(layer(x))
    return (time.perf_counter() - started) / (repeats * 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(args.model))
    if mx.default_device() == mx.cpu:  # as the daemon runs on the CPU: float32 weights through BLAS
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
        model.set_dtype(mx.float32)
    rows = [int(r) for r in args.rows.split(",")]
    results = {r: step_seconds(model, r, args.context, args.repeats) for r in rows}
    plain = {r: step_seconds(model, r, args.context, args.repeats, batch_cache=False) for r in rows}
    projection = {r: projection_seconds(model, r, args.repeats) for r in rows}
    base = results[rows[0]]
    lines = [f"{args.model.name} on {mx.default_device()}, cache {args.context} tokens per row", "",
             "| rows | step ms | tok/s (all rows) | vs 1 row | step ms, plain KVCache | one projection us | vs 1 row |",
             "|---|---|---|---|---|---|---|"]
    for r, s in results.items():
        lines.append(f"| {r} | {s * 1000:.2f} | {r / s:.0f} | {r * base / s:.2f}x | {plain[r] * 1000:.2f} "
                     f"| {projection[r] * 1e6:.0f} | {projection[r] / projection[rows[0]]:.2f}x |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "batch_step.json", {"model": str(args.model), "device": str(mx.default_device()),
                                                     "context": args.context, "step_s": results,
                                                     "plain_step_s": plain, "projection_s": projection})


if __name__ == "__main__":
    main()
