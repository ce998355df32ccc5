"""The IDE-chat turn on an NVIDIA GPU with MLX's CUDA backend: ``python -m bench.gpu_ide_chat``.

On the GPU machine (see /work/shared/gpu/README.md)::

    bash .gpu/c2/run.sh python -m bench.gpu_ide_chat --tokenizer $PWD/.gpu/c2/tok --out $OUT

An 8B-shaped llama with random 4-bit weights and the default model's tokenizer is built under
/tmp (no weights travel). Workload: a system prompt with tool definitions of ~8K and, separately,
~30K tokens (``--sizes``), then ``--turns`` turns each adding a 273-568-token user message
(seeded), ``max_tokens`` 16, greedy. Turn 1 is cold; the others are cached, each after
``--think-s`` idle seconds, the same for every system (default 0.75: the user reads the reply
and types, as quick as anyone; less than mlxkvd's write-behind delay of 1 s, after which the idle
daemon writes a cache to disk, which a turn arriving then waits for; 0: back to back, as an agent).

Systems, one after another (one MLX server process alive at a time):
  mlxkvd         the daemon over its Unix socket through the ``mlxkv`` client;
  limit          mlx-lm in this process replaying mlxkvd's conversation: the cache holds the
                 previous turn's prompt and generated ids, and only what the new prompt adds
                 beyond their common prefix is prefilled, timed to the first token on the first
                 sight of its shape; the faster of mlx-lm's two-pass way and one forward pass;
  mlx-lm cold    turn 1's whole prompt from scratch in this process (``generate_step``, its
                 default 2048-token prefill step), to the first token;
  mlx_lm_server  ``python -m mlx_lm.server``, streamed /v1/chat/completions, full history.

Each system is warmed up first with the same kinds of passes: a short prompt, one of a prefill
chunk, one of a few hundred tokens, and a cached turn onto a warm cache.

Targets: mlxkvd <= 1.15x the limit on every cached turn; faster than mlx_lm.server on every
cached turn; the cold first turn within 1.1x of mlx-lm's. ``--tiny`` runs the same logic on the
CPU with a 2-layer model (a check, not a measurement). Writes ``gpu_ide_chat.json`` and
``gpu_ide_chat.md`` under ``--out``, with the servers' logs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, models
from bench.textgen import TextMaker, tools_json

SEED = 20261203
USER_TOKENS = (273, 568)
TARGETS = {"mlxkvd_over_limit": 1.15, "cold_mlxkvd_over_mlx_lm": 1.1}
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- workload ---------------------------------------------------------------------------------


def system_prompt(text: TextMaker, tokens: int) -> str:
    """An IDE system prompt of about ``tokens``: instructions, tool definitions as JSON (~40%),
    project context; assembled from pieces counted one at a time, since TextMaker's own
    builders re-count their whole text per sentence (minutes at 30K tokens)."""
    head = ("You are a coding assistant inside an IDE. Answer briefly, cite files, and call a tool "
            "when you need to read or change the workspace.\nYou can call these tools (JSON schema):\n")
    tools: list[dict[str, Any]] = []
    count = text.count(head)
    while count < tokens * 0.4:
        batch = text.tools(400)
        for tool in batch:
            tool["name"] = f"{tool['name']}_{len(tools)}"
            tools.append(tool)
        count += text.count(tools_json(batch))
    parts = [head + tools_json(tools) + "\nProject context:"]
    count = text.count(parts[0])
    while count < tokens:
        piece = text.code(300) if len(parts) % 2 else text.prose(300)
        parts.append(piece)
        count += text.count(piece) + 1
    return "\n".join(parts)


def workload(count_tokens, size: int, turns: int) -> tuple[str, list[str]]:
    text = TextMaker(SEED + size, count_tokens)
    system = system_prompt(text, size)
    return system, [text.user_message(text.rng.randint(*USER_TOKENS)) for _ in range(turns)]


def warm_up_texts(count_tokens) -> list[str]:
    """A short prompt, one of ~2048 tokens and one of ~400, unlike the workload's text."""
    text = TextMaker(SEED - 1, count_tokens)
    return ["Say hi.", text.prose(2048), text.code(400)]


# --- systems ----------------------------------------------------------------------------------


def run_mlxkvd(args, model_dir: Path, workloads: dict, ref: common.InProcess, workdir: Path,
               cache_bytes: int | None) -> dict:
    from mlxkv import Client

    extra = ["--max-cache-bytes", str(cache_bytes)] if cache_bytes else []
    if args.debug_log:
        extra += ["--log-level", "DEBUG"]
    daemon = common.DaemonProcess(common.short_socket_dir() / "gpu.sock", workdir / "mlxkvd-cache",
                                  workdir / "mlxkvd.log", model=model_dir, extra_args=extra)
    results: dict = {}
    try:
        t0 = time.perf_counter()
        daemon.start(timeout=600)
        say(f"mlxkvd ready in {time.perf_counter() - t0:.1f} s")
        with Client(daemon.socket_path, timeout=900) as client:
            for prompt in warm_up_texts(ref.count):
                t0 = time.perf_counter()
                client.ask(prompt, max_tokens=4)
                say(f"mlxkvd warm-up ({ref.count(prompt)} tokens): {time.perf_counter() - t0:.2f} s")
            # Cached turns too, as the limit's warm-up extends a warm cache before it is timed.
            chat = client.conversation(max_tokens=4)
            for prompt in warm_up_texts(ref.count)[1:]:
                t0 = time.perf_counter()
                chat.send(prompt)
                say(f"mlxkvd warm-up turn ({ref.count(prompt)} tokens): {time.perf_counter() - t0:.2f} s")
            client.delete_conversation(chat.conversation_id)
            for size, (system, users) in workloads.items():
                conv = client.conversation(system=system, max_tokens=args.max_tokens)
                turns, prompts, generated = [], [], []
                for k, user in enumerate(users, start=1):
                    prompts.append(ref.render(conv.messages + [{"role": "user", "content": user}]))
                    if k > 1:
                        time.sleep(args.think_s)
                    ttft, total = common.stream_turn(conv, user, args.max_tokens)
                    t = conv.last_turn
                    generated.append(t.token_ids)
                    turns.append({"turn": k, "ttft_s": ttft, "total_s": total, "server_ttft_s": t.time_to_first_token_s,
                                  "prompt_tokens": t.prompt_tokens, "reused_tokens": t.cached_tokens,
                                  "prefilled_tokens": t.prefill_tokens, "completion_tokens": t.completion_tokens,
                                  "cache_source": t.cache_source, "cache_miss_reason": t.cache_miss_reason,
                                  "text": t.text})
                    say(f"mlxkvd {size} turn {k}: TTFT {ttft * 1000:.0f} ms, reused {t.cached_tokens}, "
                        f"prefilled {t.prefill_tokens}")
                client.delete_conversation(conv.conversation_id)
                results[size] = {"turns": turns, "prompts": prompts, "generated": generated}
    finally:
        daemon.stop()
    return results


def run_in_process(args, ref: common.InProcess, workloads: dict, mlxkvd: dict) -> dict:
    """mlx-lm cold on turn 1, then the limit of every cached turn, replaying mlxkvd's turns."""
    import mlx.core as mx

    results: dict = {}
    for size in workloads:
        prompts, generated = mlxkvd[size]["prompts"], mlxkvd[size]["generated"]
        warm = models.WarmCache(ref.model)
        cold_s, _ = warm.cold_first_token(prompts[0])
        say(f"mlx-lm cold {size}: {cold_s * 1000:.0f} ms for {len(prompts[0])} tokens")
        turns = []
        for k in range(1, len(prompts)):
            held = prompts[k - 1] + generated[k - 1]
            # One pass first: mlxkvd's way on a GPU, timed on its shape's first sight. The
            # two passes after it see shapes one position shorter, some of their work done.
            warm.sync(held)
            one_s, prefilled, _ = warm.first_token(prompts[k], one_pass=True)
            warm.sync(held)
            two_s, _, _ = warm.first_token(prompts[k])
            turns.append({"turn": k + 1, "two_pass_s": two_s, "one_pass_s": one_s, "ttft_s": min(two_s, one_s),
                          "prefilled_tokens": prefilled, "prompt_tokens": len(prompts[k])})
            say(f"limit {size} turn {k + 1}: {prefilled} tokens, two passes {two_s * 1000:.0f} ms, "
                f"one pass {one_s * 1000:.0f} ms")
        results[size] = {"cold_ttft_s": cold_s, "cold_prompt_tokens": len(prompts[0]), "turns": turns}
        del warm
        mx.clear_cache()
    return results


def run_mlx_lm_server(args, model_dir: Path, workloads: dict, ref: common.InProcess, workdir: Path) -> dict:
    # mlx-lm's defaults: 10 prompt caches, no byte limit; that holds these conversations.
    server = common.MlxLmServer(model_dir, workdir / "mlx_lm_server.log", cache_bytes=None, cache_size=10)
    results: dict = {}
    try:
        t0 = time.perf_counter()
        server.start(timeout=600)
        say(f"mlx_lm.server ready in {time.perf_counter() - t0:.1f} s")
        for prompt in warm_up_texts(ref.count):
            t0 = time.perf_counter()
            server.chat([{"role": "user", "content": prompt}], 4)
            say(f"mlx_lm.server warm-up ({ref.count(prompt)} tokens): {time.perf_counter() - t0:.2f} s")
        history: list[dict] = []
        for prompt in warm_up_texts(ref.count)[1:]:  # cached turns too, as for mlxkvd
            history.append({"role": "user", "content": prompt})
            history.append({"role": "assistant", "content": server.chat(history, 4).text})
        for size, (system, users) in workloads.items():
            messages = [{"role": "system", "content": system}]
            turns = []
            for k, user in enumerate(users, start=1):
                messages.append({"role": "user", "content": user})
                if k > 1:
                    time.sleep(args.think_s)
                r = server.chat(messages, args.max_tokens)
                messages.append({"role": "assistant", "content": r.text})
                usage = r.usage or {}
                reused = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                turns.append({"turn": k, "ttft_s": r.first - r.started, "total_s": r.end - r.started,
                              "prompt_tokens": usage.get("prompt_tokens"), "reused_tokens": reused,
                              "completion_tokens": usage.get("completion_tokens"), "text": r.text})
                say(f"mlx_lm.server {size} turn {k}: TTFT {(r.first - r.started) * 1000:.0f} ms, reused {reused}")
            results[size] = {"turns": turns}
    finally:
        server.stop()
    return results


# --- report -----------------------------------------------------------------------------------


def summarize(size: int, mlxkvd: dict, limit: dict, server: dict | None) -> dict:
    kv, lim = mlxkvd["turns"], {t["turn"]: t for t in limit["turns"]}
    srv = {t["turn"]: t for t in (server or {}).get("turns", [])}
    rows = []
    for t in kv:
        k = t["turn"]
        row = {"turn": k, "mlxkvd_ttft_s": t["ttft_s"], "mlxkvd_reused": t["reused_tokens"],
               "mlxkvd_prefilled": t["prefilled_tokens"], "prompt_tokens": t["prompt_tokens"]}
        if k in lim:
            row.update(limit_ttft_s=lim[k]["ttft_s"], limit_two_pass_s=lim[k]["two_pass_s"],
                       limit_one_pass_s=lim[k]["one_pass_s"], limit_prefilled=lim[k]["prefilled_tokens"],
                       mlxkvd_over_limit=common.ratio(t["ttft_s"], lim[k]["ttft_s"]))
        if k in srv:
            row.update(mlx_lm_server_ttft_s=srv[k]["ttft_s"], mlx_lm_server_reused=srv[k]["reused_tokens"],
                       mlx_lm_server_over_mlxkvd=common.ratio(srv[k]["ttft_s"], t["ttft_s"]))
        rows.append(row)
    cached = [r for r in rows if r["turn"] > 1]
    over_limit = [r.get("mlxkvd_over_limit") for r in cached]
    server_over = [r.get("mlx_lm_server_over_mlxkvd") for r in cached if "mlx_lm_server_over_mlxkvd" in r]
    cold = common.ratio(kv[0]["ttft_s"], limit["cold_ttft_s"])
    return {
        "size": size, "rows": rows,
        "cold": {"mlxkvd_ttft_s": kv[0]["ttft_s"], "mlx_lm_cold_ttft_s": limit["cold_ttft_s"],
                 "mlx_lm_server_ttft_s": srv.get(1, {}).get("ttft_s"), "prompt_tokens": limit["cold_prompt_tokens"],
                 "mlxkvd_over_mlx_lm": cold},
        "max_mlxkvd_over_limit": max((x for x in over_limit if x is not None), default=None),
        "median_mlxkvd_over_limit": common.median([x for x in over_limit if x is not None]),
        "min_mlx_lm_server_over_mlxkvd": min((x for x in server_over if x is not None), default=None),
        "targets_met": {
            "mlxkvd_le_1.15x_limit_every_cached_turn":
                all(x is not None and x <= TARGETS["mlxkvd_over_limit"] for x in over_limit),
            "mlxkvd_faster_than_mlx_lm_server_every_cached_turn":
                None if not server_over else all(x is not None and x > 1 for x in server_over),
            "cold_within_1.1x_of_mlx_lm": cold is not None and cold <= TARGETS["cold_mlxkvd_over_mlx_lm"],
        },
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    ms = lambda s: None if s is None else s * 1000  # noqa: E731
    lines = [f"# mlxkv IDE chat on {m.get('device_name', m.get('device'))}{' (tiny check)' if report['tiny'] else ''}", "",
             f"Random-weight llama {m['model_shape']['num_hidden_layers']} layers, hidden {m['model_shape']['hidden_size']}, "
             f"4-bit; mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}; mlxkvd --max-cache-bytes "
             f"{m['mlxkvd_max_cache_bytes'] or 'default'}. TTFT in ms, client side; user messages "
             f"{USER_TOKENS[0]}-{USER_TOKENS[1]} tokens, max_tokens {report['max_tokens']}, greedy; {report.get('think_s', 0):g} s idle before each "
             "cached turn. limit = min(two-pass, one-pass) prefill of the new tokens onto a warm cache in-process, "
             "first sight of each shape.", ""]
    for s in report["sizes"]:
        c = s["cold"]
        lines += [f"## system prompt ~{s['size']} tokens", "",
                  f"Cold first turn ({c['prompt_tokens']} tokens): mlxkvd {common.fmt(ms(c['mlxkvd_ttft_s']), 0)} ms, "
                  f"mlx-lm {common.fmt(ms(c['mlx_lm_cold_ttft_s']), 0)} ms, mlx_lm.server "
                  f"{common.fmt(ms(c['mlx_lm_server_ttft_s']), 0)} ms; mlxkvd / mlx-lm = "
                  f"{common.fmt(c['mlxkvd_over_mlx_lm'])} (target <= {TARGETS['cold_mlxkvd_over_mlx_lm']}).", ""]
        rows = [[r["turn"], r["prompt_tokens"], f"{r['mlxkvd_reused']}/{r['mlxkvd_prefilled']}", r.get("limit_prefilled"),
                 ms(r.get("limit_two_pass_s")), ms(r.get("limit_one_pass_s")), ms(r["mlxkvd_ttft_s"]),
                 r.get("mlxkvd_over_limit"), ms(r.get("mlx_lm_server_ttft_s")), r.get("mlx_lm_server_reused"),
                 r.get("mlx_lm_server_over_mlxkvd")] for r in s["rows"] if r["turn"] > 1]
        lines.append(common.markdown_table(
            ["turn", "prompt", "mlxkvd reused/prefilled", "limit prefilled", "limit 2-pass", "limit 1-pass",
             "mlxkvd", "mlxkvd / limit (<= 1.15)", "mlx_lm.server", "server reused", "server / mlxkvd (> 1)"], rows))
        verdicts = {True: "met", False: "not met", None: "not measured"}
        lines += ["", "Targets: " + ", ".join(f"{k}: **{verdicts[v]}**" for k, v in s["targets_met"].items())
                  + f" (max mlxkvd / limit {common.fmt(s['max_mlxkvd_over_limit'])}, median "
                  f"{common.fmt(s['median_mlxkvd_over_limit'])}; min server / mlxkvd "
                  f"{common.fmt(s['min_mlx_lm_server_over_mlxkvd'])}).", ""]
    lines.append("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()))
    return "\n".join(lines) + "\n"


# --- running ----------------------------------------------------------------------------------


def warm_up_in_process(ref: common.InProcess, count_tokens) -> tuple[dict[str, float], float]:
    """Forward passes of 2048, 300, 16 and 1 tokens, then mlx-lm's ``generate_step`` on a
    ~2100-token prompt, each timed: on the GPU the first quantized matmul of a new chunk length
    compiles a kernel (35-70 s, once per machine; a few tokens, as in a reply fed back or a
    prompt's remainder, is a length class of its own), and generate_step's own stream is set
    up on its first use. Returns the timings and the KV cache's bytes per token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(ref.model)
    timings = {}
    for n in (2048, 300, 16, 1):
        ids = mx.array([(i * 7919) % 40000 + 100 for i in range(n)], dtype=mx.uint32)[None]
        t0 = time.perf_counter()
        mx.eval(ref.model(ids, cache=cache))
        timings[f"forward_{n}"] = time.perf_counter() - t0
        say(f"in-process warm-up, {n} token(s) onto {cache[0].offset - n}: {timings[f'forward_{n}']:.2f} s")
    bytes_per_token = common.cache_nbytes(cache) / common.cache_holds(cache)
    del cache
    prompt = ref.render([{"role": "user", "content": warm_up_texts(count_tokens)[1]}])
    timings["generate_step"], _ = models.WarmCache(ref.model).cold_first_token(prompt)
    say(f"in-process warm-up, generate_step on {len(prompt)} tokens: {timings['generate_step']:.2f} s")
    mx.clear_cache()
    return timings, bytes_per_token


def device_meta() -> dict[str, Any]:
    import mlx.core as mx

    meta: dict[str, Any] = {"device": str(mx.default_device())}
    try:
        info = mx.device_info()
        meta["device_name"] = info.get("device_name") or info.get("architecture")
        meta["device_memory_bytes"] = info.get("memory_size")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_ide_chat", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="dir with the default model's tokenizer.json and "
                        "tokenizer_config.json (default: the converted default model, where installed)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    parser.add_argument("--sizes", help="system prompt sizes in tokens (default 8000,30000; --tiny 1000)")
    parser.add_argument("--turns", type=int, help="turns per size, the first cold (default 10; --tiny 3)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--think-s", type=float, default=0.75,
                        help="idle seconds before each cached turn, as a user reads and types (0: back to back)")
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    parser.add_argument("--debug-log", action="store_true",
                        help="mlxkvd logs at DEBUG (its log is copied to --out): idle duties' timings")
    parser.add_argument("--model-dir", type=Path, help="where to build the model (default: under the temp dir)")
    parser.add_argument("--mlxkvd-max-cache-bytes", default="auto",
                        help="'auto': twice the largest conversation's KV cache (at least mlxkvd's default "
                             "2 GiB, which an 8B model's 30K-token cache exceeds); 'default'; or bytes")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: a check of the logic")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1000" if args.tiny else "8000,30000")).split(",") if s]
    turns = args.turns or (3 if args.tiny else 10)
    if turns < 2:
        parser.error("--turns must be >= 2 (the first is cold)")

    import mlx.core as mx

    gpu = mx.cuda.is_available()
    if not gpu:
        if not args.tiny:
            parser.error("no CUDA device: the 8B model is for the GPU; use --tiny for a CPU check")
        common.ensure_blas()  # re-execs once with OpenBLAS; on the GPU it does not apply
    common.exit_on_sigterm()
    logging.basicConfig(level=logging.WARNING)
    tokenizer_dir = args.tokenizer or models.default_tokenizer_dir()
    shape = models.TINY_2L if args.tiny else models.LLAMA_8B
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"mlxkv-random-{'tiny' if args.tiny else '8b'}-4bit"
    timings: dict[str, float] = {}

    say(f"mlx {mx.__version__} on {mx.default_device()}; building {model_dir}")
    model_dir, timings["model_build"] = models.timed_build(
        model_dir, shape, tokenizer_dir, dtype="float32" if args.tiny else "float16", bits=4, group_size=64)
    say(f"model ready in {timings['model_build']:.1f} s")
    t0 = time.perf_counter()
    ref = common.InProcess(model_dir)
    models.check_chatml(ref.tokenizer)
    timings["model_load"] = time.perf_counter() - t0
    warm_ups, bytes_per_token = warm_up_in_process(ref, ref.count)
    timings["in_process_warm_up"] = sum(warm_ups.values())
    t0 = time.perf_counter()
    workloads = {size: workload(ref.count, size, turns) for size in sizes}
    timings["workload"] = time.perf_counter() - t0
    say(f"workloads built in {timings['workload']:.1f} s: system prompts "
        + ", ".join(f"{ref.count(s)} tokens" for s, _ in workloads.values()))
    largest = max(sizes) + turns * (USER_TOKENS[1] + args.max_tokens + 16)
    if args.mlxkvd_max_cache_bytes == "auto":
        cache_bytes = max(2 * 1024**3, int(2 * bytes_per_token * largest))
    else:
        cache_bytes = None if args.mlxkvd_max_cache_bytes == "default" else int(args.mlxkvd_max_cache_bytes)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mlxkv-gpu-"))
    report: dict[str, Any] = {
        "tiny": args.tiny, "turns": turns, "max_tokens": args.max_tokens, "think_s": args.think_s,
        "meta": {**common.machine_info(), **device_meta(), "git": common.git_state(), "model_dir": str(model_dir), "model_shape": shape.__dict__,
                 "kv_bytes_per_token": bytes_per_token, "mlxkvd_max_cache_bytes": cache_bytes,
                 "in_process_warm_up_s": warm_ups},
        "timings_s": timings, "results": {},
    }
    results = report["results"]
    try:
        t0 = time.perf_counter()
        mlxkvd = run_mlxkvd(args, model_dir, workloads, ref, workdir, cache_bytes)
        timings["mlxkvd"] = time.perf_counter() - t0
        results["mlxkvd"] = {size: {"turns": r["turns"], "generated_tokens": [len(g) for g in r["generated"]]}
                             for size, r in mlxkvd.items()}
        common.write_json(out / "gpu_ide_chat.partial.json", report)
        mx.clear_cache()
        t0 = time.perf_counter()
        results["in_process"] = run_in_process(args, ref, workloads, mlxkvd)
        timings["in_process"] = time.perf_counter() - t0
        common.write_json(out / "gpu_ide_chat.partial.json", report)
        mx.clear_cache()
        if not args.no_server:
            t0 = time.perf_counter()
            results["mlx_lm_server"] = run_mlx_lm_server(args, model_dir, workloads, ref, workdir)
            timings["mlx_lm_server"] = time.perf_counter() - t0
    finally:
        for name in ("mlxkvd.log", "mlx_lm_server.log"):
            if (workdir / name).is_file():
                shutil.copy(workdir / name, out / f"gpu_ide_chat-{name}")
        shutil.rmtree(workdir, ignore_errors=True)
    report["sizes"] = [summarize(size, results["mlxkvd"][size], results["in_process"][size],
                                 (results.get("mlx_lm_server") or {}).get(size)) for size in sizes]
    timings["total"] = time.perf_counter() - _STARTED
    common.write_json(out / "gpu_ide_chat.json", report)
    (out / "gpu_ide_chat.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (out / "gpu_ide_chat.md").write_text(text)
    print(text)
    say(f"wrote {out / 'gpu_ide_chat.json'} and {out / 'gpu_ide_chat.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
