"""The core benchmark: ``python -m bench.turn_latency [--quick] [--out DIR]``.

A conversation with a ~1,000-token history (system prompt plus user/assistant turns of fixed
text, given through ``reset``, not generated) and a ~100-token new user message:

  (a) the cached turn through the daemon: the history is cached by a previous turn of the same
      conversation, then the new message is sent as a delta;
  (b) the same turn re-prefilled from scratch: a fresh conversation id with ``reset`` and the
      whole transcript (the cached one deleted first), and the same prompt through mlx-lm in
      this process with no cache;
  (c) decode tokens/s through the socket (client side) against mlx-lm's ``stream_generate``
      in this process on the same prompt.

Every repetition uses a history that starts with its own nonce, so no repetition finds an
earlier one's cache through the daemon's shared-prefix lookup. Medians over repetitions.
Writes ``turn_latency.json`` and ``turn_latency.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.textgen import TextMaker

SEED = 1000
STORY = ("Write a long, detailed story about a lighthouse keeper who finds a map hidden in an old "
         "book. Describe every room of the lighthouse, the weather, and each step of the journey.")


def history(text: TextMaker, nonce: int, history_tokens: int, count) -> list[dict[str, str]]:
    """System prompt + user/assistant turns of fixed text, about ``history_tokens`` in all."""
    messages = [{"role": "system", "content": f"[session {nonce:04d}] "
                 + text.system_prompt(history_tokens // 4)}]
    while True:
        messages.append({"role": "user", "content": text.user_message(text.rng.randint(60, 120))})
        messages.append({"role": "assistant", "content": text.prose(text.rng.randint(60, 100))})
        if sum(count(m["content"]) + 5 for m in messages) >= history_tokens:
            return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller history, fewer repetitions")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; quick 1)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    out: Path = args.out
    workdir = common.start(out, "turn_latency")
    from mlxkv import Client

    repeats = args.repeats or (1 if args.quick else 3)
    history_tokens, new_tokens = (400, 60) if args.quick else (1000, 100)
    decode_tokens = 32 if args.quick else 128
    started_at = time.perf_counter()

    default_dir, f32_dir = common.model_dirs()
    ref = common.InProcess(f32_dir)
    ref.generate(ref.render([{"role": "user", "content": "Say hi."}]), 4)  # warm-up
    daemon = common.DaemonProcess(common.short_socket_dir() / "tl.sock", workdir / "mlxkvd",
                                  workdir / "mlxkvd.log", model=default_dir).start()
    reps: list[dict[str, Any]] = []
    decode: list[dict[str, Any]] = []
    try:
        with Client(daemon.socket_path, timeout=900) as client, \
                common.progress(repeats * 2, "turn_latency") as bar, \
                common.PeakRss(lambda: daemon.pid) as rss:
            client.ask("Say hi.", max_tokens=4)  # warm-up
            text = TextMaker(SEED, ref.count)
            for rep in range(repeats):
                hist = history(text, rep, history_tokens, ref.count)
                last_user = hist.pop()  # an assistant message: the setup turn answers the last user
                assert last_user["role"] == "assistant"
                setup_user = hist.pop()["content"]
                new_user = text.user_message(new_tokens)

                # (a) the history is cached by a turn of this conversation; then the delta.
                conv = client.conversation(system=None, max_tokens=8)
                conv.reset(hist)
                setup = conv.send(setup_user, max_tokens=1)
                t0 = time.perf_counter()
                first = None
                for _ in conv.stream(new_user):
                    first = first or time.perf_counter()
                cached = conv.last_turn
                transcript = conv.messages[:-1]  # everything the cached turn was asked
                client.delete_conversation(conv.conversation_id)

                # (b1) the same transcript, a fresh conversation id, reset: no cache to find.
                fresh = client.conversation(max_tokens=8)
                fresh.reset(transcript[:-1])
                t1 = time.perf_counter()
                first_b = None
                for _ in fresh.stream(transcript[-1]["content"]):
                    first_b = first_b or time.perf_counter()
                scratch = fresh.last_turn
                client.delete_conversation(fresh.conversation_id)

                # (b2) the same prompt through mlx-lm in this process, no cache.
                prompt = ref.render(transcript)
                inproc = ref.generate(prompt, 8)
                reps.append({
                    "history_tokens": setup.prompt_tokens + setup.completion_tokens,
                    "setup_prefilled": setup.prefill_tokens,
                    "prompt_tokens": cached.prompt_tokens,
                    "in_process_prompt_tokens": len(prompt),
                    "cached": {"ttft_s": first - t0, "server_ttft_s": cached.time_to_first_token_s,
                               "reused_tokens": cached.cached_tokens, "prefilled_tokens": cached.prefill_tokens,
                               "cache_source": cached.cache_source},
                    "scratch_daemon": {"ttft_s": first_b - t1, "server_ttft_s": scratch.time_to_first_token_s,
                                       "reused_tokens": scratch.cached_tokens,
                                       "prefilled_tokens": scratch.prefill_tokens},
                    "scratch_in_process": {"ttft_s": inproc.ttft_s, "prefilled_tokens": len(prompt)},
                })
                bar.update(1)

                # (c) decode: ~N greedy tokens through the socket vs in-process, same prompt.
                story = f"[{rep}] {STORY}"
                one_shot = client.conversation("", max_tokens=decode_tokens)
                t2 = time.perf_counter()
                first_c = None
                for _ in one_shot.stream(story):
                    first_c = first_c or time.perf_counter()
                end_c = time.perf_counter()
                turn = one_shot.last_turn
                gen = ref.generate(ref.render([{"role": "user", "content": story}]), decode_tokens)
                n = turn.completion_tokens
                decode.append({
                    "socket": {"tokens": n, "ttft_s": first_c - t2,
                               "decode_tps": (n - 1) / (end_c - first_c) if n > 1 else None,
                               "server_decode_tps": turn.decode_tokens_per_s, "finish_reason": turn.finish_reason},
                    "in_process": {"tokens": len(gen.tokens), "decode_tps": gen.decode_tps,
                                   "mlx_generation_tps": gen.mlx_generation_tps},
                })
                bar.update(1)
            rss.sample(include_hwm=True)
    finally:
        daemon.stop()

    med = common.median
    a = med([r["cached"]["ttft_s"] for r in reps])
    b_daemon = med([r["scratch_daemon"]["ttft_s"] for r in reps])
    b_inproc = med([r["scratch_in_process"]["ttft_s"] for r in reps])
    c_socket = med([d["socket"]["decode_tps"] for d in decode])
    c_inproc = med([d["in_process"]["mlx_generation_tps"] for d in decode])
    c_inproc_client = med([d["in_process"]["decode_tps"] for d in decode])
    summary = {
        "history_tokens_median": med([r["history_tokens"] for r in reps]),
        "prompt_tokens_median": med([r["prompt_tokens"] for r in reps]),
        "delta_prefilled_tokens_median": med([r["cached"]["prefilled_tokens"] for r in reps]),
        "a_cached_ttft_s": a,
        "b_scratch_daemon_ttft_s": b_daemon,
        "b_scratch_in_process_ttft_s": b_inproc,
        "b_daemon_over_a": common.ratio(b_daemon, a),
        "b_in_process_over_a": common.ratio(b_inproc, a),
        "c_socket_decode_tps": c_socket,
        "c_in_process_generation_tps": c_inproc,
        "c_in_process_client_style_tps": c_inproc_client,
        "c_socket_over_in_process": common.ratio(c_socket, c_inproc),
        "decode_tokens_socket": [d["socket"]["tokens"] for d in decode],
        "decode_tokens_in_process": [d["in_process"]["tokens"] for d in decode],
        "daemon_peak_rss_bytes": rss.peak_bytes,
    }
    report = {"quick": args.quick, "repeats": repeats,
              "meta": {**common.machine_info(), "model_dir_mlxkvd": str(default_dir),
                       "model_dir_float32": str(f32_dir)},
              "summary": summary, "repetitions": reps, "decode": decode,
              "wall_s": time.perf_counter() - started_at}
    common.write_json(out / "turn_latency.json", report)
    text = markdown(report)
    (out / "turn_latency.md").write_text(text)
    shutil.rmtree(workdir / "mlxkvd" / "kv", ignore_errors=True)
    print(text)
    print(f"wrote {out / 'turn_latency.json'} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    s = report["summary"]
    m = report["meta"]
    rows = [
        ["(a) cached turn through mlxkvd: TTFT s", s["a_cached_ttft_s"], f"prefilled {common.fmt(s['delta_prefilled_tokens_median'])} tokens"],
        ["(b) same turn from scratch through mlxkvd (fresh id + reset): TTFT s", s["b_scratch_daemon_ttft_s"],
         f"prompt {common.fmt(s['prompt_tokens_median'])} tokens"],
        ["(b) same prompt, mlx-lm in-process, no cache: TTFT s", s["b_scratch_in_process_ttft_s"], ""],
        ["(b)/(a), daemon from scratch / cached", s["b_daemon_over_a"], "target >= 5x"],
        ["(b)/(a), in-process from scratch / cached", s["b_in_process_over_a"], ""],
        ["(c) decode tok/s through the socket (client side)", s["c_socket_decode_tps"],
         f"tokens {s['decode_tokens_socket']}"],
        ["(c) decode tok/s, mlx-lm stream_generate in-process (generation_tps)", s["c_in_process_generation_tps"],
         f"tokens {s['decode_tokens_in_process']}"],
        ["(c) socket / in-process", s["c_socket_over_in_process"], "target >= 0.9x"],
        ["mlxkvd peak RSS MiB", s["daemon_peak_rss_bytes"] / 2**20, ""],
    ]
    head = (f"# mlxkv turn latency ({'quick' if report['quick'] else 'full'}; median of {report['repeats']})\n\n"
            f"History ~{common.fmt(s['history_tokens_median'])} tokens, float32 weights, OpenBLAS preloaded: "
            f"{m['blas_preloaded']}, {m['cpus']} CPUs, load average at start {m['loadavg_at_start']}.\n\n")
    return head + common.markdown_table(["figure", "value", "note"], rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
