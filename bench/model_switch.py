"""Switching models, and a long conversation's first turn after switching back: ``python -m bench.model_switch``.

One daemon, two models in its catalogue (``--models-dir``): the default model and a random-weight
llama of ``SHAPE`` (the default model's tokenizer; float16 on disk, float32 in memory on the
CPU), built once under ``results/cache/switch-models``. The daemon keeps one model resident;
``LoadModel`` switches: the resident model's caches go to the disk tier, its weights leave
memory, the other model loads.

Workload (seeded): a conversation on the default model with an IDE system prompt of
``--system-tokens`` (2,500: instructions, tool definitions as JSON, project code and prose, as
``gpu_ide_chat``) and a first user message, sent once untimed. Then ``--repeats`` (3) times:

  disk      switch to the second model (``LoadModel`` right after the last turn: the switch
            writes the conversation's cache), a short turn there (a conversation of its own, so
            that switching back has a cache to write too), switch back, and the conversation's
            next message (``--user-tokens``): its history's cache comes back from the disk tier;
  scratch   the conversation deleted (its caches with it), the same transcript given to a new
            conversation through ``reset``; the same round trip of switches, then the same
            message: the whole history is prefilled again. The new conversation carries on in
            the next repetition.

Both turns are the first after switching back, on the same prompt; TTFT is client side (the
first token's delta, ``Turn.first_token_latency_s``); greedy, so their replies should be the
same tokens. Switch times: the client's ``LoadModel`` wall time, and the daemon's ``switch_s``
(writing caches and unloading) and ``load_s``. Writes ``model_switch.{json,md}`` under ``--out``,
the daemon's log under ``model_switch-work/``. ``--quick``: a ~400-token system prompt, one
repetition, a smaller second model (a smoke test, under a minute once the models are built).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.gpu_ide_chat import system_prompt
from bench.models import LlamaShape, build_random_model, default_tokenizer_dir
from bench.textgen import TextMaker

SEED = 20260611
SHAPE = LlamaShape(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816, max_position_embeddings=8192)
QUICK_SHAPE = LlamaShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=1408, max_position_embeddings=8192)
DIRECTIONS = ("to_second", "back")
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def shape_name(shape: LlamaShape) -> str:
    return f"random-h{shape.hidden_size}-l{shape.num_hidden_layers}"


def disk_tier(status) -> tuple[int, int]:
    tier = next((t for t in status.cache_tiers if t.name == "disk"), None)
    return (tier.entries, tier.bytes) if tier is not None else (0, 0)


def switch(client, name: str, path: Path, direction: str, phase: str) -> dict[str, Any]:
    """``LoadModel(name)``, timed by the client; the daemon's own split; the RSS after it."""
    entries0, bytes0 = disk_tier(client.status())
    started = time.perf_counter()
    loaded = client.load_model(name)
    wall = time.perf_counter() - started
    status = client.status()
    entries1, bytes1 = disk_tier(status)
    if not loaded.loaded_now or Path(status.model_path) != path or status.model_state != "loaded":
        raise RuntimeError(f"LoadModel({name}) did not switch: {status.model_path} {status.model_state}")
    return {"direction": direction, "phase": phase, "model": name, "wall_s": wall, "switch_s": loaded.switch_s,
            "load_s": loaded.load_s, "rss_bytes": status.rss_bytes, "disk_entries_added": entries1 - entries0,
            "disk_bytes_added": bytes1 - bytes0}


def timed_turn(conv, content: str, max_tokens: int) -> dict[str, Any]:
    ttft, total = common.stream_turn(conv, content, max_tokens)
    t = conv.last_turn
    return {"ttft_s": ttft, "total_s": total, "server_ttft_s": t.time_to_first_token_s,
            "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens, "prefilled_tokens": t.prefill_tokens,
            "completion_tokens": t.completion_tokens, "cache_source": t.cache_source,
            "cache_miss_reason": t.cache_miss_reason, "token_ids": list(t.token_ids)}


# --- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_switch", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--repeats", type=int, help="round trips per kind of turn (default 3; quick 1)")
    parser.add_argument("--system-tokens", type=int, help="system prompt size (default 2500; quick 400)")
    parser.add_argument("--user-tokens", type=int, help="each user message's size (default 120; quick 40)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per measured turn (default 16; quick 8)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads per process (0: OpenBLAS's default, one per core)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    system_tokens = args.system_tokens or (400 if args.quick else 2500)
    user_tokens = args.user_tokens or (40 if args.quick else 120)
    max_tokens = args.max_tokens or (8 if args.quick else 16)
    shape = QUICK_SHAPE if args.quick else SHAPE
    out: Path = args.out
    workdir = common.start(out, "model_switch", blas_threads=args.blas_threads or None)
    from mlx_lm.utils import load_tokenizer
    from mlxkv import Client

    meta = {**common.machine_info(), "code": common.git_state()}
    default_dir = default_tokenizer_dir()
    models_dir = common.MODEL_CACHE_DIR / "switch-models"
    started = time.perf_counter()
    second_dir = build_random_model(models_dir / shape_name(shape), shape, default_dir, dtype="float16")
    say(f"second model {second_dir.name} ready in {time.perf_counter() - started:.1f} s")
    tokenizer = load_tokenizer(default_dir)

    def count(s: str) -> int:
        return len(tokenizer.encode(s, add_special_tokens=False))

    text = TextMaker(SEED, count)
    system = system_prompt(text, system_tokens)
    messages = [text.user_message(user_tokens) for _ in range(repeats + 1)]
    say(f"system prompt {count(system)} tokens, user messages of ~{user_tokens}")

    daemon = common.DaemonProcess(common.short_socket_dir() / "ms.sock", workdir / "mlxkvd", workdir / "mlxkvd.log",
                                  model=default_dir, extra_args=["--models-dir", str(models_dir)])
    switches: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    second_turns: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        daemon.start()
        say(f"mlxkvd ready in {time.perf_counter() - started:.1f} s")
        with Client(daemon.socket_path, timeout=900) as client:
            # Named by its directory: ListModels does so for a model given by path, and Status's
            # name for it (the directory's base name) is no name a request may use.
            first, second = str(default_dir), second_dir.name
            sizes = {m.name: (m.size_bytes, m.quantization) for m in client.list_models() if m.name in (first, second)}
            side = client.conversation(system="You are a terse assistant.", model=second, max_tokens=4)
            conv = client.conversation(system=system, model=first, max_tokens=max_tokens)
            setup = conv.send(messages[0])  # untimed: the history
            say(f"history cached: {setup.prompt_tokens} prompt tokens in {setup.total_s:.1f} s")

            def round_trip(phase: str) -> None:
                """To the second model and back, a short turn there in between."""
                switches.append(switch(client, second, second_dir, "to_second", phase))
                turn = side.send(text.prose(24))
                second_turns.append({"cache_source": turn.cache_source, "cached_tokens": turn.cached_tokens,
                                     "prompt_tokens": turn.prompt_tokens, "total_s": turn.total_s})
                switches.append(switch(client, first, default_dir, "back", phase))
                to, back = switches[-2:]
                say(f"{phase}: to {second} {to['wall_s']:.2f} s (switch {to['switch_s']:.2f}, load "
                    f"{to['load_s']:.2f}), back {back['wall_s']:.2f} s (switch {back['switch_s']:.2f}, load "
                    f"{back['load_s']:.2f})")

            for rep in range(1, repeats + 1):
                message = messages[rep]
                row: dict[str, Any] = {"rep": rep}
                round_trip("disk")
                row["disk"] = timed_turn(conv, message, max_tokens)
                transcript = conv.messages[:-2]  # the prompt of that turn, less its message
                client.delete_conversation(conv.conversation_id)
                conv = client.conversation(model=first, max_tokens=max_tokens)
                conv.reset(transcript)
                round_trip("scratch")
                row["scratch"] = timed_turn(conv, message, max_tokens)
                d, s = row["disk"], row["scratch"]
                row["same_reply"] = d["token_ids"] == s["token_ids"]
                row["speedup"] = common.ratio(s["ttft_s"], d["ttft_s"])
                rows.append(row)
                say(f"rep {rep}: prompt {d['prompt_tokens']}; from disk {d['ttft_s'] * 1000:.0f} ms "
                    f"({d['cache_source']}, cached {d['cached_tokens']}, prefilled {d['prefilled_tokens']}), "
                    f"re-prefill {s['ttft_s'] * 1000:.0f} ms (cached {s['cached_tokens']}, prefilled "
                    f"{s['prefilled_tokens']}): x{common.fmt(row['speedup'])}, same reply {row['same_reply']}")
    finally:
        daemon.stop()

    report = {
        "quick": args.quick,
        "settings": {"repeats": repeats, "system_tokens": count(system), "history_tokens": setup.prompt_tokens,
                     "user_tokens": user_tokens, "max_tokens": max_tokens, "seed": SEED,
                     "blas_threads": args.blas_threads or None, "first_model": first, "second_model": second,
                     "second_shape": shape, "model_bytes": sizes},
        "meta": meta,
        "summary": summarize(switches, rows, second_turns),
        "switches": switches, "turns": rows, "second_model_turns": second_turns,
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - _STARTED,
    }
    common.write_json(out / "model_switch.json", report)
    md = markdown(report)
    (out / "model_switch.md").write_text(md)
    print(md)
    say(f"wrote {out / 'model_switch.json'} and model_switch.md")
    return 0


def spread(values: list[float]) -> dict[str, float | None]:
    return {"median": common.median(values), "min": min(values, default=None), "max": max(values, default=None)}


def summarize(switches: list[dict[str, Any]], rows: list[dict[str, Any]],
              second_turns: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for direction in DIRECTIONS:
        for phase in ("disk", "scratch", "all"):
            part = [s for s in switches if s["direction"] == direction and phase in ("all", s["phase"])]
            summary[f"{direction}_{phase}"] = {
                "n": len(part), **{k: spread([s[k] for s in part]) for k in ("wall_s", "switch_s", "load_s")},
                "rss_bytes_median": common.median([s["rss_bytes"] for s in part]),
                "disk_bytes_added_median": common.median([s["disk_bytes_added"] for s in part])}
    for kind in ("disk", "scratch"):
        summary[kind] = {k: spread([r[kind][k] for r in rows])
                         for k in ("ttft_s", "server_ttft_s", "cached_tokens", "prefilled_tokens", "prompt_tokens")}
    speedups = [r["speedup"] for r in rows if r["speedup"] is not None]
    summary["speedup"] = spread(speedups)
    summary["speedup_of_medians"] = common.ratio(summary["scratch"]["ttft_s"]["median"],
                                                 summary["disk"]["ttft_s"]["median"])
    summary["same_replies"] = sum(r["same_reply"] for r in rows)
    summary["turns"] = len(rows)
    summary["disk_hits"] = sum(r["disk"]["cache_source"] == "disk" for r in rows)
    summary["second_model_disk_hits"] = sum(t["cache_source"] == "disk" for t in second_turns[1:])
    return summary


def markdown(report: dict[str, Any]) -> str:
    s, m, cfg = report["summary"], report["meta"], report["settings"]
    mib = 2**20

    def rng(d: dict[str, float | None], scale: float = 1.0, digits: int = 2) -> str:
        if d["median"] is None or d["min"] is None:
            return "-"
        f = f"{{:.{digits}f}}"
        return f"{f.format(d['median'] * scale)} ({f.format(d['min'] * scale)}-{f.format(d['max'] * scale)})"

    load = ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"] or ())
    load_end = ", ".join(f"{x:.2f}" for x in report["loadavg_at_end"] or ())
    sizes = cfg["model_bytes"]
    shape = cfg["second_shape"]
    first, second = Path(cfg["first_model"]).name, cfg["second_model"]

    def size(name: str) -> str:
        nbytes, quantization = sizes.get(name, (0, "?"))
        return f"{nbytes / mib:.0f} MiB {quantization}"

    lines = [
        f"# Model switch: switch times, and the first turn after switching back ({'quick' if report['quick'] else 'full'})",
        "",
        f"{m['cpus']} CPUs, {m['platform']}; mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}; OpenBLAS "
        f"{cfg['blas_threads'] or 'default'} thread(s); load average at start {load}, at the end {load_end}; daemon "
        f"code: {m['code']}. Wall time {report['wall_s']:.0f} s. Models: **{first}** "
        f"({size(cfg['first_model'])} on disk, float32 in memory) and **{second}** "
        f"(random llama, hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, "
        f"{size(cfg['second_model'])} on disk, float32 in memory). History: an IDE "
        f"system prompt of {cfg['system_tokens']} tokens and a first turn, {cfg['history_tokens']} prompt tokens; "
        f"new messages of ~{cfg['user_tokens']} tokens, max_tokens {cfg['max_tokens']}, greedy.",
        "",
        "**Switch times**, seconds, median (range); `LoadModel` right after a turn. Wall = client side; "
        "switch = the daemon writing the old model's caches to disk and unloading it; load = loading the new one.",
        "",
    ]
    rows = []
    for key, label, what in (("to_second_disk", f"{first} -> {second}", f"{cfg['history_tokens']}+ tokens"),
                             ("to_second_scratch", f"{first} -> {second}", "none"),
                             ("back_all", f"{second} -> {first}", "a short one")):
        d = s[key]
        rows.append([label, what, d["n"], rng(d["wall_s"]), rng(d["switch_s"]), rng(d["load_s"]),
                     f"{d['disk_bytes_added_median'] / mib:.1f}", f"{d['rss_bytes_median'] / mib:.0f}"])
    lines.append(common.markdown_table(["switch", "cache to write", "n", "wall s", "switch s", "load s",
                                        "disk MiB written", "RSS after, MiB"], rows))
    lines += [
        "",
        f"**First turn after switching back**, the conversation on {first}: its history's cache from "
        "the disk tier, against the same prompt prefilled from scratch (a new conversation with `reset`), each "
        "right after a round trip of switches. TTFT client side, ms, median (range).",
        "",
    ]
    d, sc = s["disk"], s["scratch"]
    lines.append(common.markdown_table(
        ["", "TTFT ms", "daemon TTFT ms", "prompt tokens", "cached tokens", "prefilled tokens"],
        [["cache from disk", rng(d["ttft_s"], 1000, 0), rng(d["server_ttft_s"], 1000, 0), rng(d["prompt_tokens"], 1, 0),
          rng(d["cached_tokens"], 1, 0), rng(d["prefilled_tokens"], 1, 0)],
         ["re-prefill", rng(sc["ttft_s"], 1000, 0), rng(sc["server_ttft_s"], 1000, 0), rng(sc["prompt_tokens"], 1, 0),
          rng(sc["cached_tokens"], 1, 0), rng(sc["prefilled_tokens"], 1, 0)]]))
    lines += [
        "",
        f"Re-prefill / from disk: **{rng(s['speedup'])}x** (of the medians {common.fmt(s['speedup_of_medians'])}x). "
        f"Cache source disk on {s['disk_hits']} of {s['turns']} turns; greedy replies equal on "
        f"**{s['same_replies']} of {s['turns']}**. The second model's own conversation found its cache on disk on "
        f"{s['second_model_disk_hits']} of {max(len(report['second_model_turns']) - 1, 0)} later visits.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
