"""What a cached turn costs beyond its new tokens: ``python -m bench.turn_overhead``.

A CPU proxy of the GPU regime: a one-layer random-weight llama (the default model's tokenizer
and ChatML template) prefills a turn's new tokens in tens of milliseconds at any history size,
so per-turn costs that grow with the history (re-rendering, re-tokenizing the whole
conversation, cache lookups) show in the time to first token the way they do on a GPU.

For each history size (``--sizes``): a system prompt carrying tool definitions plus many
user/assistant pairs of fixed text, sent as a conversation's first turn (``reset``, not
measured), then ``--turns`` cached turns that each add a ~300-token user message, greedy.

Systems, same model directory, taking turns within each turn of the conversation:
  mlxkvd         the daemon over its Unix socket through the ``mlxkv`` client (deltas);
  limit          mlx-lm in this process replaying mlxkvd's conversation: the cache holds the
                 previous turn's prompt and generated ids, and only what the new prompt adds
                 beyond their longest common prefix is prefilled, up to the first token; the
                 faster of two passes (mlx-lm's way) and one (``models.WarmCache``);
  mlx_lm_server  ``mlx_lm.server``, streamed /v1/chat/completions with the full history.

Per turn: client-side TTFT, and overhead = TTFT - limit (ms). Writes ``turn_overhead.json`` and
``turn_overhead.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import common, models
from bench.textgen import TextMaker

SEED = 20261202
TARGET_OVERHEAD_MS = 5.0  # mlxkvd, at the largest size; and flat across sizes


# --- workload ---------------------------------------------------------------------------------


def history(text: TextMaker, target_tokens: int, user_tokens: int) -> list[dict[str, str]]:
    """A system prompt with tool definitions and user/assistant pairs of fixed text, about
    ``target_tokens - user_tokens`` tokens: with the first turn's user message, ~target."""
    system_tokens = min(target_tokens // 4, 2000)
    tools = text.tools(int(system_tokens * 0.4))
    messages = [{"role": "system", "content": text.system_prompt(system_tokens, tools)}]
    total = text.count(messages[0]["content"]) + 5
    while total < target_tokens - user_tokens:
        user = text.user_message(text.rng.randint(60, 120))
        assistant = text.prose(text.rng.randint(40, 100))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        total += text.count(user) + text.count(assistant) + 10
    return messages


# --- one size ---------------------------------------------------------------------------------


def run_size(size: int, args, ref: common.InProcess, client, server: common.MlxLmServer, bar) -> dict:
    """One history size: the first turn on every system (not measured), then the cached turns,
    the three systems one after another within each turn, so that the load of this shared
    machine at that moment weighs on all of them alike."""
    text = TextMaker(SEED + size, ref.count)
    hist = history(text, size, args.user_tokens)
    first_user = text.user_message(args.user_tokens)
    users = [text.user_message(args.user_tokens) for _ in range(args.turns)]

    # First turns: mlxkvd gets the whole history with reset; the limit's cache and
    # mlx_lm.server are brought to the same point.
    conv = client.conversation(max_tokens=args.max_tokens)
    conv.reset(hist)
    first_prompt = ref.render(hist + [{"role": "user", "content": first_user}])
    setup = conv.send(first_user)
    warm = models.WarmCache(ref.model)
    warm.sync(first_prompt + setup.token_ids)
    messages = hist + [{"role": "user", "content": first_user}]
    reply = server.chat(messages, args.max_tokens)
    messages.append({"role": "assistant", "content": reply.text})
    bar.update(1)

    turns: list[dict[str, Any]] = []
    for k, user in enumerate(users, start=2):
        record: dict[str, Any] = {"turn": k}
        prompt = ref.render(conv.messages + [{"role": "user", "content": user}])  # what mlxkvd renders
        record["prompt_tokens"] = len(prompt)

        time.sleep(args.pause_s)
        ttft, total = common.stream_turn(conv, user, args.max_tokens)
        t = conv.last_turn
        record["mlxkvd"] = {
            "ttft_s": ttft, "total_s": total, "server_ttft_s": t.time_to_first_token_s,
            "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
            "prefill_tokens": t.prefill_tokens, "completion_tokens": t.completion_tokens,
            "cache_source": t.cache_source, "cache_miss_reason": t.cache_miss_reason, "resent": t.resent,
        }
        bar.update(1)

        # The limit: the cache holds the previous prompt and mlxkvd's reply to it. On the CPU
        # nothing is compiled per shape, so each way is timed a few times, the median taken.
        held = list(warm.held)
        runs: dict[str, list[float]] = {"two_pass": [], "one_pass": []}
        for way in runs:
            for _ in range(args.limit_repeats):
                warm.sync(held)
                time.sleep(args.pause_s)
                seconds, prefilled, _ = warm.first_token(prompt, one_pass=way == "one_pass")
                runs[way].append(seconds)
        two, one = common.median(runs["two_pass"]), common.median(runs["one_pass"])
        record["limit"] = {"ttft_s": min(two, one), "two_pass_s": two, "one_pass_s": one,
                           "prefill_tokens": prefilled, "runs_s": runs}
        warm.sync(prompt + t.token_ids)
        bar.update(1)

        messages.append({"role": "user", "content": user})
        time.sleep(args.pause_s)
        r = server.chat(messages, args.max_tokens)
        messages.append({"role": "assistant", "content": r.text})
        usage = r.usage or {}
        record["mlx_lm_server"] = {
            "ttft_s": r.first - r.started, "total_s": r.end - r.started,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "same_reply_as_mlxkvd": r.text == t.text,
        }
        bar.set_postfix_str(f"{size}: mlxkvd {ttft * 1000:.0f} ms, limit {record['limit']['ttft_s'] * 1000:.0f} ms, "
                            f"mlx_lm.server {(r.first - r.started) * 1000:.0f} ms")
        bar.update(1)
        turns.append(record)
    client.delete_conversation(conv.conversation_id)
    del warm

    for record in turns:
        limit = record["limit"]["ttft_s"]
        record["overhead_ms"] = {s: (record[s]["ttft_s"] - limit) * 1000 for s in ("mlxkvd", "mlx_lm_server")}
        # Against the one-pass way alone: what is left when a system prefills in one pass.
        record["mlxkvd_over_one_pass_ms"] = (record["mlxkvd"]["ttft_s"] - record["limit"]["one_pass_s"]) * 1000
    return {
        "size": size,
        "history_messages": len(hist),
        "first_turn_prompt_tokens": len(first_prompt),
        "first_turn_mlxkvd_prompt_tokens": setup.prompt_tokens,
        "first_turn_mlx_lm_server_same_reply": reply.text == setup.text,
        "turns": turns,
        "summary": summarize(turns),
    }


def summarize(turns: list[dict]) -> dict:
    med = common.median
    out: dict[str, Any] = {"limit_ttft_ms": med([t["limit"]["ttft_s"] * 1000 for t in turns]),
                           "limit_two_pass_ms": med([t["limit"]["two_pass_s"] * 1000 for t in turns]),
                           "limit_one_pass_ms": med([t["limit"]["one_pass_s"] * 1000 for t in turns]),
                           "mlxkvd_over_one_pass_ms": med([t["mlxkvd_over_one_pass_ms"] for t in turns]),
                           "limit_prefill_tokens": med([t["limit"]["prefill_tokens"] for t in turns])}
    for s in ("mlxkvd", "mlx_lm_server"):
        out[f"{s}_ttft_ms"] = med([t[s]["ttft_s"] * 1000 for t in turns])
        out[f"{s}_overhead_ms"] = med([t["overhead_ms"][s] for t in turns])
    out["mlxkvd_prefill_tokens"] = med([t["mlxkvd"]["prefill_tokens"] for t in turns])
    out["mlxkvd_prefilled_more_than_limit"] = sum(
        t["mlxkvd"]["prefill_tokens"] > t["limit"]["prefill_tokens"] for t in turns)
    out["mlxkvd_prompt_matches_limit"] = all(t["mlxkvd"]["prompt_tokens"] == t["prompt_tokens"] for t in turns)
    return out


def warm_up(text: TextMaker, ref: common.InProcess, client, server: common.MlxLmServer,
            max_tokens: int) -> None:
    """A two-turn conversation of unrelated text on every system, not measured."""
    system = text.system_prompt(200)
    first, second = text.user_message(400), text.user_message(300)
    conv = client.conversation(system=system, max_tokens=max_tokens)
    conv.send(first)
    conv.send(second)
    client.delete_conversation(conv.conversation_id)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    messages.append({"role": "assistant", "content": server.chat(messages, max_tokens).text})
    server.chat(messages + [{"role": "user", "content": second}], max_tokens)
    warm = models.WarmCache(ref.model)
    warm.sync(ref.render(messages[:2]))
    warm.first_token(ref.render(messages + [{"role": "user", "content": second}]))


def set_blas_threads(threads: int) -> None:
    """Tell an already preloaded OpenBLAS its thread count (it reads the variable at load)."""
    import ctypes

    from mlxkvd import blas

    path = blas.openblas_path()
    if path is not None and blas.is_preloaded():
        ctypes.CDLL(str(path)).openblas_set_num_threads(threads)


# --- report -----------------------------------------------------------------------------------


def verdict(sizes: list[dict]) -> dict:
    """The target: mlxkvd's median overhead flat across sizes, at most 5 ms at the largest."""
    overheads = [s["summary"]["mlxkvd_overhead_ms"] for s in sizes]
    largest, growth = overheads[-1], overheads[-1] - overheads[0]
    return {"mlxkvd_overhead_ms_by_size": overheads, "largest": largest, "growth_ms": growth,
            "met": largest <= TARGET_OVERHEAD_MS and growth <= TARGET_OVERHEAD_MS}


def markdown(report: dict) -> str:
    m = report["meta"]
    shape = m["model_shape"]
    ms = lambda s: None if s is None else s * 1000  # noqa: E731
    lines = [
        "# mlxkv per-turn overhead (CPU proxy of the GPU regime)", "",
        f"Random-weight llama ({shape['num_hidden_layers']} layer, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']} head, float32) with the default model's tokenizer; OpenBLAS preloaded: "
        f"{m['blas_preloaded']} ({report['blas_threads']} thread(s) per process); {m['cpus']} CPUs, load average at start {m['loadavg_at_start']}; daemon code: "
        f"{m['git']}. Each cached turn adds a ~{report['user_tokens']}-token user message; max_tokens "
        f"{report['max_tokens']}, greedy. TTFT is client side, ms. Every timed request of every system (each "
        f"repetition of the limit too) follows {report.get('pause_s', 0) * 1000:.0f} ms of idle time: after an "
        "idle gap the same model call costs this CPU 1.5-2.5 ms more than back to back.", "",
        "**limit**: mlx-lm in this process prefilling only what the turn adds beyond the longest common prefix "
        "with the previous turn's prompt + generated ids (mlxkvd's conversation replayed) to the first token, "
        f"median of {report['limit_repeats']} runs, the faster of two ways: *two passes* (mlx-lm's "
        "`generate_step`: the new tokens but the last into the cache, then the last one; with one layer, lazy "
        "evaluation then computes attention for the last new token only) and *one pass* (every new token "
        "through the layer, the output head on the last position). **overhead** = TTFT - limit.", "",
        "## Medians over the cached turns", "",
    ]
    rows = []
    for s in report["sizes"]:
        x = s["summary"]
        rows.append([s["first_turn_prompt_tokens"], s["history_messages"], x["limit_two_pass_ms"],
                     x["limit_one_pass_ms"], x["mlxkvd_ttft_ms"], x["mlxkvd_overhead_ms"],
                     x["mlxkvd_over_one_pass_ms"], x["mlx_lm_server_ttft_ms"], x["mlx_lm_server_overhead_ms"],
                     f"{common.fmt(x['mlxkvd_prefill_tokens'], 0)} ({common.fmt(x['limit_prefill_tokens'], 0)})"])
    lines.append(common.markdown_table(
        ["history tokens", "messages", "limit 2-pass", "limit 1-pass", "mlxkvd TTFT", "mlxkvd overhead",
         "mlxkvd - 1-pass", "mlx_lm.server TTFT", "mlx_lm.server overhead", "mlxkvd prefilled (limit)"], rows))
    v = report["verdict"]
    lines += ["", f"Target: mlxkvd's overhead flat across sizes and <= {TARGET_OVERHEAD_MS:g} ms at the largest: "
              f"{common.fmt(v['largest'], 1)} ms at the largest, {common.fmt(v['growth_ms'], 1)} ms growth from the "
              f"smallest: **{'met' if v['met'] else 'not met'}**.", ""]
    for s in report["sizes"]:
        lines += [f"## ~{s['size']} tokens: per turn", ""]
        rows = []
        for t in s["turns"]:
            k, lm, lim = t["mlxkvd"], t["mlx_lm_server"], t["limit"]
            rows.append([t["turn"], t["prompt_tokens"], lim["prefill_tokens"], ms(lim["two_pass_s"]),
                         ms(lim["one_pass_s"]), ms(k["ttft_s"]), ms(k["server_ttft_s"]),
                         f"{k['cached_tokens']}/{k['prefill_tokens']}", t["overhead_ms"]["mlxkvd"], ms(lm["ttft_s"]),
                         f"{common.fmt(lm['cached_tokens'])}/{common.fmt(lm['prompt_tokens'])}",
                         t["overhead_ms"]["mlx_lm_server"]])
        lines.append(common.markdown_table(
            ["turn", "prompt tokens", "limit prefilled", "limit 2-pass", "limit 1-pass", "mlxkvd",
             "mlxkvd server-side", "mlxkvd reused/prefilled", "mlxkvd overhead", "mlx_lm.server",
             "mlx_lm.server reused/prompt", "mlx_lm.server overhead"], rows))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,8000,32000", help="history sizes in tokens, comma-separated")
    parser.add_argument("--turns", type=int, default=6, help="cached turns per size")
    parser.add_argument("--user-tokens", type=int, default=300, help="tokens of each new user message")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn")
    parser.add_argument("--limit-repeats", type=int, default=3,
                        help="runs of the in-process limit per turn (median taken)")
    parser.add_argument("--pause-s", type=float, default=0.25,
                        help="idle time before every timed request of every system, the limit's repetitions "
                             "included (after an idle gap the same model call costs this CPU 1.5-2.5 ms more)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads of every process (this one and the servers)")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,4000 and 2 cached turns (a smoke test)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.turns = "1000,4000", 2
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    if not sizes or sizes[0] <= args.user_tokens or args.turns < 1:
        parser.error("sizes must exceed --user-tokens, and --turns must be >= 1")

    # One BLAS thread in every process: on 2 shared cores, OpenBLAS's threads wait on each other
    # (a 10 ms step then takes 10-800 ms at random); set before the re-exec, for the servers too.
    out: Path = args.out
    workdir = common.start(out, "turn_overhead", blas_threads=args.blas_threads)
    set_blas_threads(args.blas_threads)  # in case this process was started with the preload
    from mlxkv import Client

    started = time.perf_counter()
    model_dir, build_s = models.timed_build(common.MODEL_CACHE_DIR / "random-tiny-llama", models.TINY,
                                            models.default_tokenizer_dir())
    ref = common.InProcess(model_dir)
    models.check_chatml(ref.tokenizer)
    report: dict[str, Any] = {
        "quick": args.quick, "turns": args.turns, "user_tokens": args.user_tokens, "max_tokens": args.max_tokens,
        "limit_repeats": args.limit_repeats, "pause_s": args.pause_s, "blas_threads": args.blas_threads,
        "meta": {**common.machine_info(), "git": common.git_state(), "model_dir": str(model_dir),
                 "model_shape": models.TINY.__dict__,
                 "model_build_s": build_s},
        "sizes": [],
    }
    daemon = common.DaemonProcess(common.short_socket_dir() / "to.sock", workdir / "mlxkvd",
                                  workdir / "mlxkvd.log", model=model_dir)
    server = common.MlxLmServer(model_dir, workdir / "mlx_lm_server.log")
    try:
        daemon.start()
        server.start()
        with Client(daemon.socket_path, timeout=900) as client, \
                common.progress(len(sizes) * (3 * args.turns + 1), "turn_overhead") as bar:
            warm_up(TextMaker(SEED - 1, ref.count), ref, client, server, args.max_tokens)
            for size in sizes:
                report["sizes"].append(run_size(size, args, ref, client, server, bar))
                common.write_json(out / "turn_overhead.partial.json", report)
    finally:
        server.stop()
        daemon.stop()
    report["verdict"] = verdict(report["sizes"])
    report["wall_s"] = time.perf_counter() - started
    common.write_json(out / "turn_overhead.json", report)
    (out / "turn_overhead.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (out / "turn_overhead.md").write_text(text)
    shutil.rmtree(workdir / "mlxkvd" / "kv", ignore_errors=True)
    print(text)
    print(f"wrote {out / 'turn_overhead.json'}, {out / 'turn_overhead.md'} in {report['wall_s']:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
