"""How long a write-behind holds the engine: ``python -m bench.write_behind``.

In process, on the store itself (``CacheStore`` with the real ``MlxCacheOps`` and a disk tier
in a temporary directory): a conversation's cache shaped like the default model's (its layers,
KV heads and head size, float32, as the daemon holds it on the CPU) at each of ``--sizes``
tokens, room for 1024 more allocated as after a turn. Timed, median of ``--reps``:

  at once       the file written on the caller's thread (``flush``, as at shutdown, and as
                every write-behind was before writes went to a thread): the time a turn
                arriving during the write waits;
  background    ``persist_next`` as the idle engine calls it: how long it holds the caller
                (taking the copy the thread writes from), then until the file is in place.

Writes ``write_behind.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common

ROOM = 1024


def kv_shape() -> tuple[int, int, int]:
    """(layers, KV heads, head size) of the default model."""
    default, _ = common.model_dirs()
    config = json.loads((default / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], config.get("num_key_value_heads", heads), head_dim


def make_cache(tokens: int, shape: tuple[int, int, int]) -> list:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    layers, heads, dim = shape
    allocated = -(-(tokens + ROOM) // 256) * 256
    cache = []
    for _ in range(layers):
        layer = KVCache()
        layer.keys = mx.random.normal((1, heads, allocated, dim))
        layer.values = mx.random.normal((1, heads, allocated, dim))
        layer.offset = tokens
        cache.append(layer)
    mx.eval([c.state for c in cache])
    return cache


def one(tokens: int, shape: tuple[int, int, int], background: bool) -> dict:
    from mlxkvd.kvcache import MlxCacheOps
    from mlxkvd.store import CacheStore

    disk = Path(tempfile.mkdtemp(prefix="mlxkv-write-behind-"))
    try:
        store = CacheStore(MlxCacheOps(), fingerprint="bench", max_bytes=16 << 30, disk_dir=disk,
                           max_disk_bytes=16 << 30)
        store.checkin("conv", list(range(tokens)), make_cache(tokens, shape))
        started = time.perf_counter()
        if not background:
            store.flush()
            held = time.perf_counter() - started
            return {"held_s": held, "in_place_s": held, "file_bytes": sum(p.stat().st_size for p in disk.iterdir())}
        store.persist_next()
        held = time.perf_counter() - started
        while store.writing:
            store.persist_next()
            time.sleep(0.005)
        return {"held_s": held, "in_place_s": time.perf_counter() - started,
                "file_bytes": sum(p.stat().st_size for p in disk.iterdir())}
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def markdown(report: dict) -> str:
    lines = ["# Write-behind: how long it holds the engine", "",
             f"A cache shaped like the default model's ({report['shape']}), float32, in process; median of "
             f"{report['reps']}. ms.", "",
             "| tokens | file MB | at once: held | background: held | background: file in place | held, background / at once |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['tokens']} | {r['file_bytes'] / 1e6:.0f} | {r['at_once_held_s'] * 1e3:.0f} | "
                     f"{r['background_held_s'] * 1e3:.0f} | {r['background_in_place_s'] * 1e3:.0f} | "
                     f"{r['background_held_s'] / r['at_once_held_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_behind", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,8000,16000", help="cache sizes in tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="500 and 2000 tokens, once: a check")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.reps = "500,2000", 1
    common.ensure_blas()
    shape = kv_shape()
    report = {"meta": {**common.machine_info(), "git": common.git_state()}, "shape":
              "layers {}, KV heads {}, head size {}".format(*shape), "reps": args.reps, "rows": []}
    for tokens in [int(s) for s in args.sizes.split(",") if s]:
        runs = {True: [], False: []}
        for _ in range(args.reps):  # alternated, so that both ways meet the same machine
            for background in (False, True):
                runs[background].append(one(tokens, shape, background))
        row = {"tokens": tokens, "file_bytes": runs[True][0]["file_bytes"],
               "at_once_held_s": statistics.median(r["held_s"] for r in runs[False]),
               "background_held_s": statistics.median(r["held_s"] for r in runs[True]),
               "background_in_place_s": statistics.median(r["in_place_s"] for r in runs[True])}
        print(f"{tokens} tokens: {json.dumps(row)}", file=sys.stderr, flush=True)
        report["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "write_behind.json", report)
    text = markdown(report)
    (args.out / "write_behind.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
