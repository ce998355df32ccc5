"""Concurrent conversations: ``python -m bench.concurrency [--quick]``.

At 1, 2, 4 and 8 conversations at once (``--levels``), each a multi-turn greedy chat held by
its own client thread: a system prompt of ~``--system-tokens`` (seeded prose and code, one per
conversation and level: no cache is shared across conversations or levels) and ``--turns``
user messages of ~``--user-tokens``, ``--max-tokens`` each. All the conversations of a level
start together; each sends its next turn as soon as its reply ends.

Systems, same weights (SmolLM2-135M-Instruct as float32) and BLAS (``--blas-threads`` OpenBLAS
threads per process, default 1: on 2 shared cores two spinning BLAS threads per process make a
step take 3-30x longer at random), all started at once and taking turns within each level, so
that the load of this shared machine at that moment weighs on all of them alike:
  mlxkvd         the daemon with continuous batching (default ``--max-batch 8``), its Unix
                 socket, the ``mlxkv`` client (deltas);
  mlxkvd_serial  the same daemon with ``--max-batch 1``: one turn at a time, the others queued;
  mlx_lm_server  ``mlx_lm.server`` (its own ``BatchGenerator`` batching), streamed
                 ``/v1/chat/completions`` with the whole history every turn.

``--gpu`` (MLX's CUDA backend): the three systems serve an 8B-shaped 4-bit model with random
weights and the default model's tokenizer (``--tokenizer``), built there (no weights travel);
its replies never end early, so every turn generates ``--max-tokens``; mlxkvd's memory budget
is 32 GiB (mlx_lm.server's prompt cache has none). ``--gpu-weights float16`` serves the same
shape unquantized (16 GB), whose matrix products do not go through MLX's CUDA kernel for 4-bit
weights (one projection costs 4.0x as much for 8 rows as for one: ``bench.batch_step``).
Each system has the GPU alone: started, warmed up, measured at every level and stopped before
the next one starts (no other process holds device memory or runs work meanwhile). Each system
first runs one unmeasured round at every level, so that kernels compiled at first sight of a
shape weigh on no measured level: a lone turn and a batch run different kernels, and a batch
of 2 rows others than one of 8 (a daemon warmed only by a round of 8 compiled its lone-turn
kernels for a 200-token prompt during the measured level 1, taking a lone turn from 170 to
31-139 tokens/s: single steps of 90-640 ms of host CPU time inside ``mx.async_eval``).

Per level and system: aggregate generated tokens/s (every reply token of the level over the
wall time from the release to the last reply's end), time to first token p50/p95 (client
side), per-stream decode tokens/s (median; from a reply's first delta to its end), turn time,
the longest gap between two deltas of any reply (a streaming turn waiting for others' prefill).
Greedy agreement: mlxkvd batched against mlxkvd serial, token ids, turn by turn while the two
histories are the same (a turn that differs changes the next prompts); mlx_lm.server against
mlxkvd serial by text, the same way. Writes ``concurrency.json`` and ``concurrency.md`` under
``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench import common
from bench.textgen import TextMaker

SEED = 20261203
SYSTEMS = ("mlxkvd", "mlxkvd_serial", "mlx_lm_server")
LABELS = {"mlxkvd": "mlxkvd batched", "mlxkvd_serial": "mlxkvd serial (--max-batch 1)",
          "mlx_lm_server": "mlx_lm.server"}


# --- workload ---------------------------------------------------------------------------------


def workload(level: int, count: Callable[[str], int], args, seed: int = SEED) -> list[dict[str, Any]]:
    """The level's conversations: the same for every system."""
    chats = []
    for i in range(level):
        text = TextMaker(seed + 1000 * level + i, count)
        chats.append({"system": text.system_prompt(args.system_tokens),
                      "users": [text.user_message(args.user_tokens) for _ in range(args.turns)]})
    return chats


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 of 8 values is their maximum)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


# --- one system, one level --------------------------------------------------------------------


def mlxkvd_chat(socket_path: Path, chat: dict, max_tokens: int) -> Callable[[], list[dict]]:
    def run() -> list[dict]:
        from mlxkv import Client

        records = []
        with Client(socket_path, timeout=1800) as client:
            conv = client.conversation(system=chat["system"], max_tokens=max_tokens)
            for user in chat["users"]:
                started = time.perf_counter()
                last, gap = None, 0.0
                for _ in conv.stream(user):
                    now = time.perf_counter()
                    gap = max(gap, now - (last or now))
                    last = now
                end = time.perf_counter()
                t = conv.last_turn
                first = started + (t.first_token_latency_s if t.first_token_latency_s is not None else end - started)
                records.append({"started": started, "first": first, "end": end, "text": t.text,
                                "token_ids": list(t.token_ids), "completion_tokens": t.completion_tokens,
                                "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
                                "queue_s": t.done.timings.queue_s, "finish_reason": t.finish_reason,
                                "max_gap_s": gap})
            client.delete_conversation(conv.conversation_id)
        return records
    return run


def server_chat(server: common.MlxLmServer, chat: dict, max_tokens: int) -> Callable[[], list[dict]]:
    def run() -> list[dict]:
        messages = [{"role": "system", "content": chat["system"]}]
        records = []
        for user in chat["users"]:
            messages.append({"role": "user", "content": user})
            r = server.chat(messages, max_tokens)
            messages.append({"role": "assistant", "content": r.text})
            usage = r.usage or {}
            records.append({"started": r.started, "first": r.first, "end": r.end, "text": r.text,
                            "completion_tokens": usage.get("completion_tokens") or r.chunks,
                            "prompt_tokens": usage.get("prompt_tokens"),
                            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                            "finish_reason": r.finish_reason, "max_gap_s": r.max_gap})
        return records
    return run


def run_level(runs: list[Callable[[], list[dict]]], bar, label: str) -> dict:
    """Every conversation on its own thread, released together."""
    barrier = threading.Barrier(len(runs) + 1)
    results: list[list[dict] | None] = [None] * len(runs)
    errors: list[str] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = runs[i]()
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            errors.append(f"{type(exc).__name__}: {exc}")
        if bar is not None:
            bar.update(len(results[i] or ()))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(runs))]
    for t in threads:
        t.start()
    barrier.wait()
    released = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - released
    turns = [r for conv in results if conv for r in conv]
    tokens = sum(r["completion_tokens"] for r in turns)
    ttfts = [r["first"] - r["started"] for r in turns]
    decode = [(r["completion_tokens"] - 1) / (r["end"] - r["first"])
              for r in turns if r["completion_tokens"] > 1 and r["end"] > r["first"]]
    summary = {
        "conversations": len(runs), "turns": len(turns), "failed": len(errors), "errors": errors[:5],
        "generated_tokens": tokens, "wall_s": wall, "aggregate_tokens_per_s": tokens / wall if wall else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "decode_tokens_per_s_median": common.median(decode),
        "turn_s_median": common.median([r["end"] - r["started"] for r in turns]),
        "gap_max_s": max((r["max_gap_s"] for r in turns), default=None),
        "queue_s_max": max((r.get("queue_s") or 0.0 for r in turns), default=None),
    }
    if bar is not None:
        bar.set_postfix_str(f"{label} x{len(runs)}: {summary['aggregate_tokens_per_s']:.1f} tok/s, "
                            f"TTFT p50 {summary['ttft_p50_s']:.2f} s")
    return {"summary": summary, "conversations": results}


# --- agreement --------------------------------------------------------------------------------


def agreement(a: list[list[dict]], b: list[list[dict]], key: str) -> dict:
    """Turn-by-turn equality of two systems' replies (``key``: "token_ids" or "text") while
    their histories are the same: after the first turn that differs, the prompts differ."""
    compared = equal = whole = 0
    first_differences = []
    for i, (x, y) in enumerate(zip(a, b)):
        if not x or not y:
            continue
        same = True
        for k, (tx, ty) in enumerate(zip(x, y)):
            compared += 1
            if tx[key] == ty[key]:
                equal += 1
                continue
            same = False
            if key == "token_ids":
                at = next((j for j, (p, q) in enumerate(zip(tx[key], ty[key])) if p != q),
                          min(len(tx[key]), len(ty[key])))
                first_differences.append({"conversation": i, "turn": k + 1, "token": at})
            else:
                first_differences.append({"conversation": i, "turn": k + 1})
            break
        whole += same
    return {"turns_compared": compared, "turns_equal": equal, "conversations": len(a),
            "conversations_equal": whole, "rate": equal / compared if compared else None,
            "first_differences": first_differences}


# --- report -----------------------------------------------------------------------------------


def fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "-"


def markdown(report: dict) -> str:
    m, a = report["meta"], report["args"]
    lines = [
        "# mlxkv concurrent conversations", "",
        (f"An 8B-shaped {'4-bit' if a.get('gpu_weights', '4bit') == '4bit' else 'float16'} model with random "
         f"weights (the default model's tokenizer) on {m.get('device_name') or 'a GPU'} with MLX's CUDA backend, "
         "each system alone on the GPU after an unmeasured round at every level; "
         if a.get("gpu") else
         f"SmolLM2-135M-Instruct (float32) on the CPU; OpenBLAS preloaded: {m['blas_preloaded']} "
         f"({a['blas_threads']} thread(s) per process); ")
        + f"{m['cpus']} CPUs, "
        f"load average at start {fmt_load(m['loadavg_at_start'])}, at the end {fmt_load(report['loadavg_at_end'])} "
        f"(the machine is shared); daemon code: {m['git']}. Each conversation: a "
        f"~{a['system_tokens']}-token system prompt, {a['turns']} turns of ~{a['user_tokens']}-token user messages, "
        f"max_tokens {a['max_tokens']}, greedy; all conversations of a level start together and send each next "
        f"turn as soon as the reply ends. Wall time {report['wall_s']:.0f} s.", "",
        "**aggregate tok/s**: every generated token of the level / wall time from the release to the last reply. "
        "**TTFT**: client side, every turn of the level (p95 nearest rank). **stream decode**: one reply's "
        "(tokens - 1) / (last delta - first delta), median. **longest gap**: the longest time between two "
        "deltas of any reply of the level. **vs serial**: aggregate tok/s over mlxkvd serial's.", "",
    ]
    rows = []
    for level in report["levels"]:
        serial = level["systems"].get("mlxkvd_serial", {}).get("summary", {})
        for system in report["systems"]:
            s = level["systems"][system]["summary"]
            rows.append([level["conversations"], LABELS[system], s["turns"], s["failed"], s["generated_tokens"],
                         s["wall_s"], s["aggregate_tokens_per_s"], s["ttft_p50_s"], s["ttft_p95_s"],
                         s["decode_tokens_per_s_median"], s["turn_s_median"], s.get("gap_max_s"),
                         common.ratio(s["aggregate_tokens_per_s"], serial.get("aggregate_tokens_per_s"))])
    lines.append(common.markdown_table(
        ["conversations", "system", "turns", "failed", "tokens", "wall s", "aggregate tok/s", "TTFT p50 s",
         "TTFT p95 s", "stream decode tok/s", "turn s (median)", "longest gap s", "vs serial"], rows))
    lines += ["", "## Greedy agreement", "",
              "Turn by turn while both histories are the same (after a turn that differs, the next prompts "
              "differ). mlxkvd batched against serial compares token ids; mlx_lm.server against mlxkvd serial "
              "compares text (its stream carries no ids).", ""]
    rows = []
    for level in report["levels"]:
        for name, g in level["agreement"].items():
            rows.append([level["conversations"], name, f"{g['turns_equal']}/{g['turns_compared']}", g["rate"],
                         f"{g['conversations_equal']}/{g['conversations']}",
                         "; ".join(f"conv {d['conversation']} turn {d['turn']}"
                                   + (f" token {d['token']}" if "token" in d else "")
                                   for d in g["first_differences"]) or "-"])
    lines.append(common.markdown_table(
        ["conversations", "pair", "turns equal", "rate", "conversations equal", "first difference"], rows))
    if report.get("batching_log_lines") is not None:
        lines += ["", f"mlxkvd batched logged {report['batching_log_lines']} `batching:` hand-overs (a lone "
                  "turn running serially became a batch row when another turn arrived); mlxkvd serial logged "
                  f"{report['serial_batching_log_lines']}.", ""]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------


def gpu_model(args) -> tuple[Path, Path]:
    """``--gpu``: the 8B-shaped random model, built once (for both roles of ``model_dirs``)."""
    import tempfile

    import mlx.core as mx

    from bench import models

    if not mx.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    bits = 4 if args.gpu_weights == "4bit" else None
    path, seconds = models.timed_build(Path(tempfile.gettempdir()) / f"mlxkv-random-8b-{args.gpu_weights}",
                                       models.LLAMA_8B, args.tokenizer or models.default_tokenizer_dir(),
                                       dtype="float16", bits=bits, group_size=64)
    print(f"model {path} ready in {seconds:.1f} s", file=sys.stderr, flush=True)
    return path, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,2,4,8", help="conversations at once, comma-separated")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens generated per turn")
    parser.add_argument("--system-tokens", type=int, default=120, help="system prompt size (tokens)")
    parser.add_argument("--user-tokens", type=int, default=40, help="user message size (tokens)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"some of {','.join(SYSTEMS)}")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads of every process (this one and the servers)")
    parser.add_argument("--quick", action="store_true", help="levels 1,2,4, 2 turns of 12 tokens (a smoke test)")
    parser.add_argument("--gpu", action="store_true", help="an 8B-shaped random model on MLX's CUDA backend (4-bit: --gpu-weights)")
    parser.add_argument("--tokenizer", type=Path, help="--gpu: a dir with the default model's tokenizer files")
    parser.add_argument("--gpu-weights", choices=("4bit", "float16"), default="4bit",
                        help="--gpu: the random model's weights, quantized to 4 bits or not")
    parser.add_argument("--daemon-log-level", default="INFO", help="the mlxkvd daemons' --log-level (DEBUG: "
                        "each batch step that prefilled, each sampling pass; logs under OUT/concurrency-work)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.turns, args.max_tokens = "1,2,4", 2, 12
    levels = sorted({int(x) for x in args.levels.split(",") if x})
    systems = [s for s in args.systems.split(",") if s]
    if not levels or levels[0] < 1 or args.turns < 1 or set(systems) - set(SYSTEMS):
        parser.error("levels must be >= 1, --turns >= 1, systems among " + ",".join(SYSTEMS))

    out: Path = args.out
    if args.gpu:
        from bench.gpu_ide_chat import device_meta

        workdir = common.fresh_workdir(out, "concurrency-work")
        common.exit_on_sigterm()
    else:
        workdir = common.start(out, "concurrency", blas_threads=args.blas_threads)
    from tokenizers import Tokenizer

    started = time.perf_counter()
    default_dir, f32_dir = gpu_model(args) if args.gpu else common.model_dirs()
    tokenizer = Tokenizer.from_file(str(default_dir / "tokenizer.json"))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    chats = {level: workload(level, count, args) for level in levels}

    sock = common.short_socket_dir()
    # Both daemons' options. On the GPU the 8B model's caches outgrow the default 2 GiB budget
    # at 8 conversations; mlx_lm.server keeps its prompt caches without a byte budget.
    daemon_args = ["--max-disk-bytes", "0", "--log-level", args.daemon_log_level,
                   *(["--max-cache-bytes", "32GiB"] if args.gpu else [])]
    servers: dict[str, Any] = {
        "mlxkvd": common.DaemonProcess(sock / "batched.sock", workdir / "batched", workdir / "mlxkvd.log",
                                       model=default_dir if args.gpu else None,
                                       extra_args=daemon_args),
        "mlxkvd_serial": common.DaemonProcess(sock / "serial.sock", workdir / "serial", workdir / "mlxkvd_serial.log",
                                              model=default_dir if args.gpu else None,
                                              extra_args=[*daemon_args, "--max-batch", "1"]),
        "mlx_lm_server": common.MlxLmServer(f32_dir, workdir / "mlx_lm_server.log"),
    }
    report: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "systems": systems,
        "meta": {**common.machine_info(), **(device_meta() if args.gpu else {}), "git": common.git_state(),
                 "model_dir": str(default_dir),
                 "mlx_lm_server_model_dir": str(f32_dir)},
        "levels": [],
    }
    def make(system: str, chat: dict) -> Callable[[], list[dict]]:
        server = servers[system]
        if system == "mlx_lm_server":
            return server_chat(server, chat, args.max_tokens)
        return mlxkvd_chat(server.socket_path, chat, args.max_tokens)

    warm = {"system": "You are terse.", "users": ["Say hi.", "Again."]}
    total = sum(levels) * args.turns * len(systems)
    results: dict[str, dict[int, dict]] = {s: {} for s in systems}

    def start(system: str) -> None:
        servers[system].start()
        make(system, warm)()  # not measured
        if args.gpu:  # every shape once (a lone turn's, each batch size's), not measured
            for level in levels:
                run_level([make(system, c) for c in workload(level, count, args, seed=SEED - 1)],
                          None, f"{LABELS[system]} (warm-up, {level})")

    def measure(system: str, level: int, bar) -> None:
        results[system][level] = run_level([make(system, c) for c in chats[level]], bar, LABELS[system])
        common.write_json(out / "concurrency.partial.json", results)

    try:
        with common.progress(total, "concurrency") as bar:
            if args.gpu:  # one system at a time holds the GPU
                for system in systems:
                    start(system)
                    for level in levels:
                        measure(system, level, bar)
                    servers[system].stop()
            else:  # every server up at once (an idle one costs nothing), taking turns at each level
                for system in systems:
                    start(system)
                for level in levels:
                    for system in systems:
                        measure(system, level, bar)
    finally:
        for server in servers.values():
            server.stop()
    for level in levels:
        entry: dict[str, Any] = {"conversations": level,
                                 "systems": {s: results[s][level] for s in systems}, "agreement": {}}
        serial = results.get("mlxkvd_serial", {}).get(level)
        if serial is not None and "mlxkvd" in results:
            entry["agreement"]["mlxkvd batched vs serial (ids)"] = agreement(
                results["mlxkvd"][level]["conversations"], serial["conversations"], "token_ids")
        if serial is not None and "mlx_lm_server" in results:
            entry["agreement"]["mlx_lm.server vs mlxkvd serial (text)"] = agreement(
                results["mlx_lm_server"][level]["conversations"], serial["conversations"], "text")
        report["levels"].append(entry)
    for system, key in (("mlxkvd", "batching_log_lines"), ("mlxkvd_serial", "serial_batching_log_lines")):
        log_path = servers[system].log_path
        report[key] = log_path.read_text(errors="replace").count("batching:") if log_path.exists() else None
    report["wall_s"] = time.perf_counter() - started
    report["loadavg_at_end"] = os.getloadavg()
    common.write_json(out / "concurrency.json", report)
    (out / "concurrency.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (out / "concurrency.md").write_text(text)
    print(text)
    print(f"wrote {out / 'concurrency.json'}, {out / 'concurrency.md'} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
