"""Time to first token after Enter, with and without a warm-up of the draft: ``python -m bench.warm_up``.

``Conversation.warm(draft)`` prefills what the user has typed so far onto the conversation's
cache while they are still typing; the ``send`` of the finished message then prefills only what
differs from the draft. This measures what that saves, on the default model.

Workload, IDE chat sized for the model's 8192-token context (seeded): a system prompt of
``--system-tokens`` (2,500: instructions, tool definitions as JSON, project code and prose,
built by ``gpu_ide_chat.system_prompt``, whose last piece takes it to ~2,700), then
``--turns`` (8) user messages of 150-400 tokens, ``max_tokens`` 16, greedy. Two conversations with the same content, one turn each in turn, the
order swapped every turn to cancel drift:

  cold     ``send(message)``;
  warmed   ``warm(draft)``, the draft being the message less its last ``--cut-words`` (8) words
           (what the user had typed before finishing); once it returns (the user is still
           typing), a ``--pause-s`` (0.25 s) pause, then ``send(message)``.

Turn 1 is a cold start of the whole prompt for both; the warmed conversation's warm-up then
prefills the system prompt and the draft (the first message is where a warm-up saves most).

Each conversation has a daemon of its own (same model, same settings): in one daemon the two
identical conversations would take each other's caches through the shared-prefix lookup (on
turn 1 the second one finds the first one's prompt; later, a warmed turn whose draft does not
cover the message finds the cold conversation's finished turn), so neither figure would be what
it says. Before each measured step both daemons are left to go idle (write-behind to disk
done), so that neither works while the other is timed. OpenBLAS runs one thread per process
(``--blas-threads``): with two on a shared 2-core machine, a thread waiting for its descheduled
partner spins, and a few-token prefill can take seconds of CPU.

TTFT "after Enter" is client side, from calling ``stream`` to the first token's delta
(``Turn.first_token_latency_s``, as ``common.stream_turn``), the same for both; the daemon's
CPU time (all threads) from the call to the first text is recorded too: the load of a shared
machine changes wall time, not the work. Per turn: prompt tokens, cached and prefilled tokens of
both, the warm-up's prefilled tokens and time, and whether the two greedy replies are the same
tokens. Writes ``warm_up.json`` and ``warm_up.md`` under ``--out``, the daemons' logs under
``warm_up-work/``. ``--quick``: a ~600-token system prompt, 3 turns of 60-120 tokens, 8 tokens
generated (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.gpu_ide_chat import system_prompt
from bench.models import common_prefix
from bench.textgen import TextMaker

SEED = 20261204
SIDES = ("cold", "warmed")
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- workload ---------------------------------------------------------------------------------


def workload(count_tokens, system_tokens: int, turns: int, user_tokens: tuple[int, int]) -> tuple[str, list[str]]:
    text = TextMaker(SEED, count_tokens)
    system = system_prompt(text, system_tokens)
    return system, [text.user_message(text.rng.randint(*user_tokens)) for _ in range(turns)]


def draft_of(message: str, cut_words: int) -> str:
    """What the user had typed before the last ``cut_words`` words of ``message``."""
    starts = [m.start() for m in re.finditer(r"\S+", message)]
    if len(starts) <= cut_words:
        return message[: len(message) // 2].rstrip()
    return message[: starts[-cut_words]].rstrip()


# --- measurement ------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process, all its threads (clock-tick resolution)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(daemons, min_s: float = 1.3, quiet_s: float = 0.4, max_s: float = 20.0) -> float:
    """Wait until no daemon uses CPU (its write-behind to disk starts 1 s after a turn): at least
    ``min_s``, then until a ``quiet_s`` window in which their CPU time grew by < 20 ms."""
    started = time.perf_counter()
    time.sleep(min_s)
    last = [cpu_seconds(d.pid) or 0.0 for d in daemons]
    while time.perf_counter() - started < max_s:
        time.sleep(quiet_s)
        now = [cpu_seconds(d.pid) or 0.0 for d in daemons]
        if all(b - a < 0.02 for a, b in zip(last, now)):
            break
        last = now
    return time.perf_counter() - started


def timed_turn(conv, content: str, max_tokens: int, pid: int | None) -> dict[str, Any]:
    """One streamed turn: client-side TTFT (``Turn.first_token_latency_s``, as
    ``common.stream_turn``), turn time, and the daemon's CPU time to the first text."""
    cpu0 = cpu_seconds(pid)
    cpu_first = None
    started = time.perf_counter()
    for _ in conv.stream(content, max_tokens=max_tokens):
        if cpu_first is None:
            cpu_first = cpu_seconds(pid)
    end = time.perf_counter()
    t = conv.last_turn
    ttft = t.first_token_latency_s if t.first_token_latency_s is not None else end - started
    return {
        "ttft_s": ttft, "total_s": end - started,
        "cpu_to_text_s": cpu_first - cpu0 if None not in (cpu_first, cpu0) else None,
        "server_ttft_s": t.time_to_first_token_s, "prompt_tokens": t.prompt_tokens,
        "cached_tokens": t.cached_tokens, "prefilled_tokens": t.prefill_tokens,
        "completion_tokens": t.completion_tokens, "cache_source": t.cache_source,
        "cache_miss_reason": t.cache_miss_reason, "finish_reason": t.finish_reason,
        "text": t.text, "token_ids": list(t.token_ids),
    }


def timed_warm(conv, draft: str, pid: int | None) -> dict[str, Any]:
    cpu0 = cpu_seconds(pid)
    started = time.perf_counter()
    w = conv.warm(draft)
    wall = time.perf_counter() - started
    cpu1 = cpu_seconds(pid)
    return {"prompt_tokens": w.prompt_tokens, "cached_tokens": w.cached_tokens,
            "prefilled_tokens": w.prefilled_tokens, "superseded": w.superseded, "total_s": w.total_s,
            "wall_s": wall, "cpu_s": cpu1 - cpu0 if None not in (cpu0, cpu1) else None}


def warm_up_daemon(client, max_tokens: int) -> None:
    """Not measured: a turn, a warm-up and the turn after it on unrelated text, then deleted."""
    text = TextMaker(SEED - 1, lambda s: len(s.split()))  # words: no tokenizer needed here
    conv = client.conversation(system="You are a helpful assistant.", max_tokens=max_tokens)
    conv.send(text.prose(200))
    message = text.prose(120)
    conv.warm(draft_of(message, 8))
    conv.send(message)
    client.delete_conversation(conv.conversation_id)


# --- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_up", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--turns", type=int, help="user turns, the first cold (default 8; quick 3)")
    parser.add_argument("--system-tokens", type=int, help="system prompt size (default 2500; quick 600)")
    parser.add_argument("--user-tokens", help="user message size range lo,hi (default 150,400; quick 60,120)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per turn (default 16; quick 8)")
    parser.add_argument("--cut-words", type=int, default=8, help="words the draft lacks of the message")
    parser.add_argument("--pause-s", type=float, default=0.25, help="from the warm-up's answer to Enter")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads per process (0: OpenBLAS's default, one per core)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    turns = args.turns or (3 if args.quick else 8)
    system_tokens = args.system_tokens or (600 if args.quick else 2500)
    lo, hi = (int(n) for n in (args.user_tokens or ("60,120" if args.quick else "150,400")).split(","))
    max_tokens = args.max_tokens or (8 if args.quick else 16)
    if turns < 2:
        parser.error("--turns must be >= 2 (the first is cold)")
    out: Path = args.out
    workdir = common.start(out, "warm_up", blas_threads=args.blas_threads or None)
    from mlxkv import Client

    meta = {**common.machine_info(), "code": common.git_state()}
    default_dir, _ = common.model_dirs()
    ref = common.InProcess(default_dir)  # its tokenizer counts and renders; no generation
    system, users = workload(ref.count, system_tokens, turns, (lo, hi))
    drafts = [draft_of(u, args.cut_words) for u in users]
    say(f"system prompt {ref.count(system)} tokens; user messages "
        + ", ".join(str(ref.count(u)) for u in users))

    daemons = {side: common.DaemonProcess(common.short_socket_dir() / "wu.sock", workdir / f"mlxkvd-{side}",
                                          workdir / f"mlxkvd-{side}.log", model=default_dir)
               for side in SIDES}
    rows: list[dict[str, Any]] = []
    try:
        for side, daemon in daemons.items():
            t0 = time.perf_counter()
            daemon.start()
            say(f"mlxkvd ({side}) ready in {time.perf_counter() - t0:.1f} s")
        with Client(daemons["cold"].socket_path, timeout=900) as cold_client, \
                Client(daemons["warmed"].socket_path, timeout=900) as warm_client, \
                common.progress(turns, "warm_up") as bar:
            clients = {"cold": cold_client, "warmed": warm_client}
            for side, client in clients.items():
                t0 = time.perf_counter()
                warm_up_daemon(client, 4)
                say(f"mlxkvd ({side}) warm-up: {time.perf_counter() - t0:.1f} s")
            convs = {side: clients[side].conversation(f"warm-up-bench-{side}", system=system, max_tokens=max_tokens)
                     for side in SIDES}
            for k, (user, draft) in enumerate(zip(users, drafts), start=1):
                order = SIDES if k % 2 else SIDES[::-1]
                # What the warmed turn should prefill: the final prompt beyond its common prefix
                # with the draft's (the daemon feeds at least one token again).
                history = convs["warmed"].messages
                draft_ids = ref.render(history + [{"role": "user", "content": draft}])
                final_ids = ref.render(history + [{"role": "user", "content": user}])
                expected = len(final_ids) - min(common_prefix(draft_ids, final_ids), len(final_ids) - 1)
                row: dict[str, Any] = {"turn": k, "order": list(order), "user_tokens": ref.count(user),
                                       "draft_tokens": ref.count(draft), "rendered_prompt_tokens": len(final_ids),
                                       "expected_warmed_prefilled": expected}
                for side in order:
                    daemon, conv = daemons[side], convs[side]
                    row.setdefault("settle_s", {})[side] = settle(list(daemons.values()))
                    if side == "warmed":
                        warm = timed_warm(conv, draft, daemon.pid)
                        time.sleep(args.pause_s)  # the user finishes typing and presses Enter
                        row["warm"] = warm
                    row[side] = timed_turn(conv, user, max_tokens, daemon.pid)
                c, w = row["cold"], row["warmed"]
                row["same_reply"] = c["token_ids"] == w["token_ids"]
                row["speedup"] = common.ratio(c["ttft_s"], w["ttft_s"])
                row["cpu_speedup"] = common.ratio(c["cpu_to_text_s"], w["cpu_to_text_s"])
                rows.append(row)
                say(f"turn {k}: prompt {c['prompt_tokens']}, cold {c['ttft_s'] * 1000:.0f} ms "
                    f"(prefilled {c['prefilled_tokens']}), warm-up {row['warm']['prefilled_tokens']} tokens "
                    f"in {row['warm']['total_s']:.2f} s, warmed {w['ttft_s'] * 1000:.0f} ms "
                    f"(prefilled {w['prefilled_tokens']}, expected {expected}), "
                    f"x{common.fmt(row['speedup'])}, same reply {row['same_reply']}")
                bar.update(1)
            for side in SIDES:
                clients[side].delete_conversation(convs[side].conversation_id)
    finally:
        for daemon in daemons.values():
            daemon.stop()
    for side in SIDES:
        shutil.rmtree(workdir / f"mlxkvd-{side}" / "kv", ignore_errors=True)

    report = {
        "quick": args.quick,
        "settings": {"turns": turns, "system_tokens_target": system_tokens, "system_tokens": ref.count(system),
                     "user_tokens_range": [lo, hi], "max_tokens": max_tokens, "cut_words": args.cut_words,
                     "pause_s": args.pause_s, "seed": SEED, "model_dir": str(default_dir),
                     "blas_threads": args.blas_threads or None},
        "meta": meta,
        "summary": summarize(rows),
        "turns": rows,
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - _STARTED,
    }
    common.write_json(out / "warm_up.json", report)
    text = markdown(report)
    (out / "warm_up.md").write_text(text)
    print(text)
    say(f"wrote {out / 'warm_up.json'} and warm_up.md")
    return 0


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = common.median
    first, cached = rows[0], rows[1:]

    def side(key: str, field: str, part: list[dict[str, Any]]) -> list:
        return [r[key][field] for r in part]

    cold_ttft, warm_ttft = side("cold", "ttft_s", cached), side("warmed", "ttft_s", cached)
    speedups = [r["speedup"] for r in cached if r["speedup"] is not None]
    cpu_speedups = [r["cpu_speedup"] for r in cached if r["cpu_speedup"] is not None]
    return {
        "cached_turns": len(cached),
        "cached_cold_ttft_s_median": med(cold_ttft),
        "cached_warmed_ttft_s_median": med(warm_ttft),
        "cached_speedup_median": med(speedups),
        "cached_speedup_min": min(speedups, default=None),
        "cached_speedup_max": max(speedups, default=None),
        "cached_speedup_of_medians": common.ratio(med(cold_ttft), med(warm_ttft)),
        "cached_cpu_speedup_median": med(cpu_speedups),
        "cached_cold_prefilled_median": med(side("cold", "prefilled_tokens", cached)),
        "cached_warmed_prefilled_median": med(side("warmed", "prefilled_tokens", cached)),
        "cached_warm_up_prefilled_median": med(side("warm", "prefilled_tokens", cached)),
        "cached_warm_up_total_s_median": med(side("warm", "total_s", cached)),
        "turn1_prompt_tokens": first["cold"]["prompt_tokens"],
        "turn1_cold_ttft_s": first["cold"]["ttft_s"],
        "turn1_warmed_ttft_s": first["warmed"]["ttft_s"],
        "turn1_speedup": first["speedup"],
        "turn1_cpu_speedup": first["cpu_speedup"],
        "turn1_warm_up_prefilled": first["warm"]["prefilled_tokens"],
        "turn1_warm_up_total_s": first["warm"]["total_s"],
        "turn1_warmed_prefilled": first["warmed"]["prefilled_tokens"],
        "same_replies": sum(r["same_reply"] for r in rows),
        "turns": len(rows),
        "warmed_prefilled_as_expected": sum(r["warmed"]["prefilled_tokens"] == r["expected_warmed_prefilled"]
                                            for r in rows),
        "warm_ups_superseded": sum(r["warm"]["superseded"] for r in rows),
    }


def markdown(report: dict[str, Any]) -> str:
    s, m, cfg = report["summary"], report["meta"], report["settings"]

    def ms(v: float | None) -> int | None:
        return round(v * 1000) if v is not None else None

    load = ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"] or ())
    load_end = ", ".join(f"{x:.2f}" for x in report["loadavg_at_end"] or ())
    lines = [
        f"# Warm-up of the draft: time to first token after Enter ({'quick' if report['quick'] else 'full'})",
        "",
        f"{m['cpus']} CPUs, {m['platform']}; mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}; OpenBLAS preloaded: "
        f"{m['blas_preloaded']} ({cfg['blas_threads'] or 'default'} thread(s) per process); load average at start "
        f"{load}, at the end {load_end}; daemon code: {m['code']}. "
        f"Wall time {report['wall_s']:.0f} s.",
        "",
        f"IDE chat on {Path(cfg['model_dir']).name}: a system prompt with tool definitions of "
        f"{cfg['system_tokens']} tokens, {cfg['turns']} user messages of {cfg['user_tokens_range'][0]}-"
        f"{cfg['user_tokens_range'][1]} tokens, max_tokens {cfg['max_tokens']}, greedy. **cold**: `send(message)`; "
        f"**warmed**: `warm(draft)` (the message less its last {cfg['cut_words']} words), its answer, "
        f"{cfg['pause_s']} s, then `send(message)`. Each conversation has a daemon of its own (one daemon would "
        "let the two identical conversations take each other's caches); the two go one after the other within "
        "each turn, the order swapped every turn, both daemons idle before each step. TTFT = client side, from "
        "the call to the first token's delta, ms; CPU = the daemon's CPU time from the call to the first text, "
        "ms. Turn 1 is a cold start of the whole prompt (its warm-up prefills the system prompt and the draft).",
        "",
    ]
    rows = []
    for r in report["turns"]:
        c, w, wu = r["cold"], r["warmed"], r["warm"]
        rows.append([r["turn"], c["prompt_tokens"], ms(c["ttft_s"]), c["prefilled_tokens"], wu["prefilled_tokens"],
                     ms(w["ttft_s"]), w["prefilled_tokens"], r["speedup"], wu["total_s"], ms(c["cpu_to_text_s"]),
                     ms(w["cpu_to_text_s"]), r["cpu_speedup"], "yes" if r["same_reply"] else "**no**"])
    lines.append(common.markdown_table(
        ["turn", "prompt tokens", "cold TTFT ms", "cold prefilled", "warm-up prefilled", "warmed TTFT ms",
         "warmed prefilled", "speed-up cold/warmed", "warm-up s", "cold CPU ms", "warmed CPU ms", "CPU speed-up",
         "same reply"], rows))
    lines += [
        "",
        f"**Cached turns (2-{s['turns']})**: median TTFT cold {common.fmt(ms(s['cached_cold_ttft_s_median']), 0)} ms, "
        f"warmed {common.fmt(ms(s['cached_warmed_ttft_s_median']), 0)} ms; speed-up median "
        f"**{common.fmt(s['cached_speedup_median'])}x** (range {common.fmt(s['cached_speedup_min'])}-"
        f"{common.fmt(s['cached_speedup_max'])}, of the medians {common.fmt(s['cached_speedup_of_medians'])}x; "
        f"CPU time {common.fmt(s['cached_cpu_speedup_median'])}x). Prefilled after Enter: median "
        f"{common.fmt(s['cached_cold_prefilled_median'], 0)} tokens cold, "
        f"{common.fmt(s['cached_warmed_prefilled_median'], 0)} warmed; the warm-up prefilled a median "
        f"{common.fmt(s['cached_warm_up_prefilled_median'], 0)} tokens in "
        f"{common.fmt(s['cached_warm_up_total_s_median'])} s while the user typed.",
        "",
        f"**Turn 1** ({s['turn1_prompt_tokens']} prompt tokens, nothing cached): cold "
        f"{common.fmt(ms(s['turn1_cold_ttft_s']), 0)} ms, warmed {common.fmt(ms(s['turn1_warmed_ttft_s']), 0)} ms: "
        f"**{common.fmt(s['turn1_speedup'])}x** (CPU time {common.fmt(s['turn1_cpu_speedup'])}x); its warm-up "
        f"prefilled {s['turn1_warm_up_prefilled']} tokens in {common.fmt(s['turn1_warm_up_total_s'])} s, the send "
        f"{s['turn1_warmed_prefilled']}.",
        "",
        f"**Replies**: {s['same_replies']} of {s['turns']} turns gave the same greedy tokens cold and warmed. "
        f"The warmed send prefilled exactly the tokens beyond the draft's common prefix (from the model's chat "
        f"template) on {s['warmed_prefilled_as_expected']} of {s['turns']} turns; "
        f"{s['warm_ups_superseded']} warm-up(s) superseded.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
