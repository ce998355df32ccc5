"""A cached turn's forward pass with and without fixed attention shapes:
``python -m bench.fixed_shapes``.

In process, on the 8B-shaped random 4-bit model (``bench.models.LLAMA_8B``, built under /tmp;
``--tiny``: a 2-layer one on the CPU, a check of the logic). For a cache of ``--contexts``
tokens, ``--turns`` cached turns of 273-568 random new tokens each (seeded), every pass timed
to its logits:

  plain, first sight    mlx-lm's pass onto the cache, on a shape it has not seen (what every
                        MLX system pays per turn: on CUDA, cuDNN builds an attention plan);
  plain, second sight   the same pass again (the plan built): what the pass itself costs;
  last head, second     the same pass with the output head for the last position only
                        (``mlxkvd.heads.OnePosition``, as mlxkvd's passes run);
  mlxkvd, first sight   mlxkvd's pass as a turn that arrives back to back meets it (no idle
                        time to plan its shape): the cache given room for the next turn, the
                        head for the last position, one more new token (a shape not seen);
  fixed, warmed         ``mlxkvd.fixed_shapes.forward`` (the pass in whole blocks of positions)
                        after ``warm`` planned the next turn's likely shapes, as the idle
                        engine does (the cache given room for 1024 more tokens first);
  fixed, cold           the same in an allocation no plan was built for.

Also the time ``warm`` takes, and how the logits of the last real token agree
between the plain and the fixed pass (greedy token equal; largest absolute difference).
Writes ``fixed_shapes.json`` and ``fixed_shapes.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common, models

SEED = 20261203
NEW_TOKENS = (273, 568)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn):
    import mlx.core as mx

    started = time.perf_counter()
    out = fn()
    mx.eval(out)
    return time.perf_counter() - started, out


def run_context(model, head, context: int, turns: int, rng: random.Random, vocab: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxkvd import fixed_shapes
    from mlxkvd.idle import NEXT_TURN_ROOM
    from mlxkvd.kvcache import MlxCacheOps

    ops = MlxCacheOps()

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    cache = make_prompt_cache(model)
    for start in range(0, context, 2048):
        model(mx.array([ids(min(2048, context - start))], dtype=mx.uint32), cache=cache)
        mx.eval([c.state for c in cache])
    rows = []
    for turn in range(turns):
        n = rng.randint(*NEW_TOKENS)
        new = ids(n)
        offset = cache[0].offset
        row: dict = {"offset": offset, "new": n, "span": fixed_shapes.span(offset, n)}

        def plain():
            return model(mx.array([new], dtype=mx.uint32), cache=cache)[:, -1, :]

        def back():
            for c in cache:
                c.offset = offset

        row["plain_first_s"], plain_logits = timed(plain)
        back()
        row["plain_second_s"], _ = timed(plain)
        back()
        row["last_head_second_s"], last_logits = timed(lambda: head.logits(mx.array([new], dtype=mx.uint32), cache))
        back()
        row["last_head_same_token"] = bool(mx.argmax(last_logits).item() == mx.argmax(plain_logits).item())
        ops.make_room(cache, NEXT_TURN_ROOM)
        longer = mx.array([new + ids(1)], dtype=mx.uint32)
        row["mlxkvd_first_s"], _ = timed(lambda: head.logits(longer, cache))
        back()
        # As the idle engine leaves it: room for the next turn, its likely shapes planned.
        ops.make_room(cache, fixed_shapes.MAX_BLOCKS * fixed_shapes.BLOCK)
        spans = fixed_shapes.likely_spans(offset, fixed_shapes.allocated(cache))
        started = time.perf_counter()
        row["warm_passes"] = fixed_shapes.warm(model, cache, spans, lambda: False)
        row["warm_s"] = time.perf_counter() - started
        row["fixed_warmed_s"], fixed_logits = timed(lambda: fixed_shapes.forward(head, new, cache))
        back()
        # A larger allocation, which no plan was built for: the blocked pass builds its own.
        ops.make_room(cache, fixed_shapes.MAX_BLOCKS * fixed_shapes.BLOCK + 256 * (turn + 3))
        row["fixed_cold_s"], _ = timed(lambda: fixed_shapes.forward(head, new, cache))
        a, b = plain_logits.astype(mx.float32), fixed_logits.astype(mx.float32)
        row["same_greedy_token"] = bool(mx.argmax(a).item() == mx.argmax(b).item())
        row["max_abs_logit_diff"] = float(mx.max(mx.abs(a - b)).item())
        # The turn's reply, as the next turn's history.
        model(mx.array([ids(16)], dtype=mx.uint32), cache=cache)
        mx.eval([c.state for c in cache])
        say(f"  {context}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
        rows.append(row)
    return {"turns": rows}


def summary(rows: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("plain_first_s", "plain_second_s", "last_head_second_s", "mlxkvd_first_s", "fixed_cold_s", "fixed_warmed_s", "warm_s")}
    return {**med, "fixed_warmed_over_plain_first": med["fixed_warmed_s"] / med["plain_first_s"],
            "same_greedy_token": sum(r["same_greedy_token"] for r in rows), "turns": len(rows),
            "last_head_same_token": sum(r["last_head_same_token"] for r in rows),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows)}


def markdown(report: dict) -> str:
    lines = [f"# Fixed attention shapes: one cached turn's pass ({report['meta'].get('device')})", "",
             "ms, median over the turns; 273-568 new tokens per turn.", "",
             "| context | plain, first sight | plain, second sight | last head, second | mlxkvd, first sight | fixed, cold | "
             "fixed, warmed | warmed / plain first | warm (all likely shapes) | same greedy token | "
             "max logit diff | last head same token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for context, r in report["results"].items():
        s = r["summary"]
        lines.append(f"| {context} | {s['plain_first_s'] * 1e3:.1f} | {s['plain_second_s'] * 1e3:.1f} | "
                     f"{s['last_head_second_s'] * 1e3:.1f} | {s['mlxkvd_first_s'] * 1e3:.1f} | "
                     f"{s['fixed_cold_s'] * 1e3:.1f} | {s['fixed_warmed_s'] * 1e3:.1f} | "
                     f"{s['fixed_warmed_over_plain_first']:.2f} | {s['warm_s'] * 1e3:.0f} | "
                     f"{s['same_greedy_token']}/{s['turns']} | {s['max_abs_logit_diff']:.3g} | "
                     f"{s['last_head_same_token']}/{s['turns']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="dir with the default model's tokenizer files")
    parser.add_argument("--contexts", default=None, help="cache sizes in tokens (default 8000,30000)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: a check of the logic")
    args = parser.parse_args(argv)
    import mlx.core as mx

    if not args.tiny and not mx.cuda.is_available():
        parser.error("no CUDA device: use --tiny for a CPU check")
    contexts = [int(c) for c in (args.contexts or ("1000" if args.tiny else "8000,30000")).split(",")]
    tokenizer_dir = args.tokenizer or models.default_tokenizer_dir()
    shape = models.TINY_2L if args.tiny else models.LLAMA_8B
    model_dir = Path(tempfile.gettempdir()) / f"mlxkv-random-{'tiny' if args.tiny else '8b'}-4bit"
    model_dir, build_s = models.timed_build(model_dir, shape, tokenizer_dir,
                                            dtype="float32" if args.tiny else "float16", bits=4, group_size=64)
    ref = common.InProcess(model_dir)
    model = ref.model
    say(f"model ready ({build_s:.1f} s); warming up kernels")
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for n in (2048, 300, 16, 1, 512, 1024):  # quantized matmul kernels per length class, once
        t, _ = timed(lambda n=n: model(mx.zeros((1, n), dtype=mx.uint32), cache=cache))
        say(f"  warm-up pass of {n}: {t:.2f} s")
    cache = None
    from mlxkvd.heads import OnePosition

    head = OnePosition(model, lambda: make_prompt_cache(model))
    say(f"head for one position: {head.shortcut}")
    rng = random.Random(SEED)
    vocab = len(ref.tokenizer.vocab) if hasattr(ref.tokenizer, "vocab") else 32000
    report = {"meta": {**common.machine_info(), "device": str(mx.default_device()),
                       "git": common.git_state(), "model_shape": shape.__dict__}, "results": {}}
    for context in contexts:
        say(f"context {context}")
        result = run_context(model, head, context, args.turns, rng, min(vocab, 40000))
        result["summary"] = summary(result["turns"])
        report["results"][context] = result
        mx.clear_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "fixed_shapes.json", report)
    text = markdown(report)
    (args.out / "fixed_shapes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
