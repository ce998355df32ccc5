"""Multi-turn workloads replayed against three systems: ``python -m bench.multiturn``.

Systems, each with the same float32 weights and the same BLAS, warm-up excluded:
  stateless      mlx-lm in this process, the whole prompt prefilled every turn (no cache);
  mlx_lm_server  ``mlx_lm.server`` on 127.0.0.1, its prompt cache, streamed chat completions;
  mlxkvd         the daemon over its Unix socket, through the ``mlxkv`` client.

Workloads (generated here, seeded; no network, no datasets):
  ide_chat       a long system prompt with tool definitions, then N turns;
  restart        the same, every server restarted after turn N/2;
  many_chats     conversations interleaved round-robin, cache budgets that hold 3 of them;
  shared_prefix  new conversations sharing the system prompt and tools (first turn each).

Per turn: time to first token (client side), tokens prefilled and reused, decode tokens/s,
turn time; per system and workload: peak RSS of the serving process. Writes
``multiturn.json``, ``multiturn.md`` and ``multiturn.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.multiturn_report import headline, markdown, plot
from bench.textgen import TextMaker

SYSTEMS = ("stateless", "mlx_lm_server", "mlxkvd")
WORKLOADS = ("ide_chat", "restart", "many_chats", "shared_prefix")
SEED = 20261129


# --- workloads --------------------------------------------------------------------------------


@dataclass
class Chat:
    system: str
    users: list[str]


@dataclass
class Workload:
    name: str
    chats: list[Chat]
    schedule: list[tuple[int, int]]  # (chat index, turn index), in the order they are sent
    max_tokens: int
    restart_after: int | None = None  # restart the servers before this step (0-based)
    cache_bytes: int | None = None  # cache budget of mlxkvd and mlx_lm.server; None: defaults
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    ide_system: int
    ide_turns: int
    user_min: int
    user_max: int
    max_tokens: int
    many_chats: int
    many_turns: int
    many_system: int
    many_max_tokens: int
    shared_convs: int
    shared_max_tokens: int


FULL = Sizes(ide_system=1500, ide_turns=10, user_min=100, user_max=300, max_tokens=64,
             many_chats=12, many_turns=3, many_system=400, many_max_tokens=32,
             shared_convs=8, shared_max_tokens=32)
QUICK = Sizes(ide_system=300, ide_turns=3, user_min=40, user_max=80, max_tokens=8,
              many_chats=4, many_turns=2, many_system=80, many_max_tokens=8,
              shared_convs=2, shared_max_tokens=8)
DEFAULT_CACHE_BYTES = 2 * 1024**3  # mlxkvd's default --max-cache-bytes, given to both servers
HELD_CONVERSATIONS = 3  # the many_chats budget holds this many conversations


def ide_system_prompt(text: TextMaker, tokens: int) -> str:
    # SmolLM2's chat template ignores `tools`: the tool JSON is part of the system prompt text,
    # for every system alike, so that the token counts are those of a real IDE request.
    tools = text.tools(int(tokens * 0.4))
    return text.system_prompt(tokens, tools)


def build_workloads(sizes: Sizes, count_tokens, bytes_per_token: float, render_len) -> dict[str, Workload]:
    text = TextMaker(SEED, count_tokens)
    system = ide_system_prompt(text, sizes.ide_system)
    users = [text.user_message(text.rng.randint(sizes.user_min, sizes.user_max)) for _ in range(sizes.ide_turns)]
    ide = Chat(system, users)
    schedule = [(0, i) for i in range(sizes.ide_turns)]
    workloads = {
        "ide_chat": Workload("ide_chat", [ide], schedule, sizes.max_tokens),
        "restart": Workload("restart", [ide], schedule, sizes.max_tokens, restart_after=sizes.ide_turns // 2),
    }

    chats = []
    for _ in range(sizes.many_chats):
        chats.append(Chat(
            text.system_prompt(sizes.many_system),
            [text.user_message(text.rng.randint(sizes.user_min, sizes.user_max)) for _ in range(sizes.many_turns)],
        ))
    # A conversation's final size, generated tokens and template included, rounded up to the
    # KV cache's 256-token allocation step: the budget holds HELD_CONVERSATIONS of the largest.
    final = max(
        render_len([{"role": "system", "content": c.system}]
                   + [m for u in c.users for m in ({"role": "user", "content": u},
                                                  {"role": "assistant", "content": ""})])
        + sizes.many_turns * sizes.many_max_tokens
        for c in chats
    )
    per_chat = math.ceil(final / 256) * 256 * bytes_per_token
    budget = int(HELD_CONVERSATIONS * per_chat)
    many = Workload(
        "many_chats", chats,
        [(c, t) for t in range(sizes.many_turns) for c in range(sizes.many_chats)],
        sizes.many_max_tokens, cache_bytes=budget,
        notes={"largest_conversation_tokens": final, "bytes_per_token": bytes_per_token,
               "cache_budget_bytes": budget, "held_conversations": HELD_CONVERSATIONS},
    )
    shared_users = [text.user_message(text.rng.randint(sizes.user_min, sizes.user_max))
                    for _ in range(sizes.shared_convs)]
    shared = Workload(
        "shared_prefix", [Chat(system, [u]) for u in shared_users],
        [(c, 0) for c in range(sizes.shared_convs)], sizes.shared_max_tokens,
    )
    workloads["many_chats"] = many
    workloads["shared_prefix"] = shared
    return workloads


# --- systems ----------------------------------------------------------------------------------


class Stateless:
    """mlx-lm in-process, a fresh cache every turn. With ``measure_limit``, the previous
    turn's cache is also used to time prefilling only the new tokens: the physical limit."""

    name = "stateless"

    def __init__(self, reference: common.InProcess):
        self.ref = reference
        self.measure_limit = False

    def start(self, workload: Workload, workdir: Path) -> None:
        self.measure_limit = workload.name in ("ide_chat", "restart")

    def pid(self) -> int | None:
        return os.getpid()

    def open(self, system: str) -> dict:
        return {"messages": [{"role": "system", "content": system}], "cache": None, "held": None}

    def turn(self, state: dict, user: str, max_tokens: int) -> dict:
        messages = state["messages"] + [{"role": "user", "content": user}]
        prompt = self.ref.render(messages)
        record: dict[str, Any] = {}
        if state["cache"] is not None:
            limit_s, limit_tokens = self.ref.prefill_delta_ttft(state["cache"], state["held"], prompt)
            record.update(limit_ttft_s=limit_s, limit_prefill_tokens=limit_tokens)
        state["cache"] = None
        cache = self.ref.make_cache()
        gen = self.ref.generate(prompt, max_tokens, cache=cache)
        if self.measure_limit:
            state["cache"], state["held"] = cache, prompt + gen.tokens
        state["messages"] = messages + [{"role": "assistant", "content": gen.text}]
        record.update(
            ttft_s=gen.ttft_s, prompt_tokens=len(prompt), reused_tokens=0, prefilled_tokens=len(prompt),
            completion_tokens=len(gen.tokens), decode_tps=gen.decode_tps,
            mlx_generation_tps=gen.mlx_generation_tps, total_s=gen.total_s,
        )
        return record

    def restart(self) -> None:
        pass  # nothing is kept between turns

    def stop(self) -> None:
        pass


class MlxLmServerSystem:
    name = "mlx_lm_server"

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.server: common.MlxLmServer | None = None

    def start(self, workload: Workload, workdir: Path) -> None:
        budget = workload.cache_bytes or DEFAULT_CACHE_BYTES
        self.server = common.MlxLmServer(self.model_dir, workdir / f"mlx_lm_server-{workload.name}.log",
                                         cache_bytes=budget).start()
        self.server.chat([{"role": "user", "content": "Say hi."}], 4)  # warm-up

    def pid(self) -> int | None:
        return self.server.pid if self.server else None

    def open(self, system: str) -> dict:
        return {"messages": [{"role": "system", "content": system}]}

    def turn(self, state: dict, user: str, max_tokens: int) -> dict:
        assert self.server is not None
        messages = state["messages"] + [{"role": "user", "content": user}]
        r = self.server.chat(messages, max_tokens)
        state["messages"] = messages + [{"role": "assistant", "content": r.text}]
        usage = r.usage or {}
        prompt = usage.get("prompt_tokens")
        reused = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        completion = usage.get("completion_tokens") or r.chunks
        decode_s = r.end - r.first
        return {
            "ttft_s": r.first - r.started,
            "prompt_tokens": prompt,
            "reused_tokens": reused,
            "prefilled_tokens": prompt - reused if prompt is not None and reused is not None else None,
            "completion_tokens": completion,
            "decode_tps": (completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0,
            "total_s": r.end - r.started,
            "finish_reason": r.finish_reason,
        }

    def restart(self) -> None:
        assert self.server is not None
        self.server.restart()

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None


class MlxkvdSystem:
    name = "mlxkvd"

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.daemon: common.DaemonProcess | None = None
        self.client = None
        self.sock_dir = common.short_socket_dir()

    def start(self, workload: Workload, workdir: Path) -> None:
        from mlxkv import Client

        args = ["--max-cache-bytes", str(workload.cache_bytes or DEFAULT_CACHE_BYTES)]
        self.daemon = common.DaemonProcess(
            self.sock_dir / f"{workload.name}.sock",
            workdir / f"mlxkvd-{workload.name}",  # a fresh cache dir: an empty disk tier
            workdir / f"mlxkvd-{workload.name}.log",
            model=self.model_dir,
            extra_args=args,
        ).start()
        self.client = Client(self.daemon.socket_path, timeout=900)
        self.client.ask("Say hi.", max_tokens=4)  # warm-up

    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def open(self, system: str):
        return self.client.conversation(system=system)

    def turn(self, conv, user: str, max_tokens: int) -> dict:
        started = time.perf_counter()
        first = None
        for _ in conv.stream(user, max_tokens=max_tokens):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        first = first or end
        t = conv.last_turn
        decode_s = end - first
        return {
            "ttft_s": first - started,
            "prompt_tokens": t.prompt_tokens,
            "reused_tokens": t.cached_tokens,
            "prefilled_tokens": t.prefill_tokens,
            "completion_tokens": t.completion_tokens,
            "decode_tps": (t.completion_tokens - 1) / decode_s if t.completion_tokens > 1 and decode_s > 0 else 0.0,
            "total_s": end - started,
            "server_ttft_s": t.time_to_first_token_s,
            "server_decode_tps": t.decode_tokens_per_s,
            "cache_source": t.cache_source,
            "resent": t.resent,
            "finish_reason": t.finish_reason,
        }

    def restart(self) -> None:
        assert self.daemon is not None
        self.daemon.restart()

    def stop(self) -> None:
        if self.client:
            self.client.close()
            self.client = None
        if self.daemon:
            self.daemon.stop()
            self.daemon = None


# --- running ----------------------------------------------------------------------------------


def run_workload(system, workload: Workload, workdir: Path, bar) -> dict:
    system.start(workload, workdir)
    turns: list[dict] = []
    started = time.perf_counter()
    try:
        with common.PeakRss(system.pid) as rss:
            states: dict[int, Any] = {}
            for step, (chat, turn) in enumerate(workload.schedule):
                if workload.restart_after is not None and step == workload.restart_after:
                    rss.sample(include_hwm=system.name != "stateless")
                    system.restart()
                if chat not in states:
                    states[chat] = system.open(workload.chats[chat].system)
                record = system.turn(states[chat], workload.chats[chat].users[turn], workload.max_tokens)
                record.update(step=step + 1, conversation=chat + 1, turn=turn + 1)
                turns.append(record)
                bar.set_postfix_str(f"{workload.name}/{system.name} ttft {record['ttft_s']:.2f}s")
                bar.update(1)
            rss.sample(include_hwm=system.name != "stateless")
    finally:
        system.stop()
    return {"turns": turns, "peak_rss_bytes": rss.peak_bytes, "wall_s": time.perf_counter() - started}


def _ttft(result: dict, system: str, step: int) -> float | None:
    turns = (result.get(system) or {}).get("turns") or []
    return turns[step - 1]["ttft_s"] if len(turns) >= step else None


def _median_ttft(result: dict, system: str, steps) -> float | None:
    turns = (result.get(system) or {}).get("turns") or []
    values = [t["ttft_s"] for t in turns if t["step"] in steps]
    return common.median(values) if values else None


def summarize(name: str, workload: Workload, result: dict) -> dict:
    """The headline ratios of one workload (None where a system was not run)."""
    n = len(workload.schedule)
    out: dict[str, Any] = {}
    per_step = {}
    for step in range(1, n + 1):
        k, s, m = (_ttft(result, x, step) for x in ("mlxkvd", "stateless", "mlx_lm_server"))
        per_step[step] = {"stateless_over_mlxkvd": common.ratio(s, k), "mlx_lm_server_over_mlxkvd": common.ratio(m, k)}
    out["per_step"] = per_step
    if name in ("ide_chat", "restart"):
        out["last_turn"] = n
        out["last_turn_stateless_over_mlxkvd"] = per_step[n]["stateless_over_mlxkvd"]
        out["last_turn_mlx_lm_server_over_mlxkvd"] = per_step[n]["mlx_lm_server_over_mlxkvd"]
        cached = range(2, n + 1)
        out["median_cached_turn_mlx_lm_server_over_mlxkvd"] = common.ratio(
            _median_ttft(result, "mlx_lm_server", cached), _median_ttft(result, "mlxkvd", cached))
    if name == "ide_chat":
        # The physical limit: mlx-lm prefilling only the new tokens onto a warm cache.
        kv = (result.get("mlxkvd") or {}).get("turns") or []
        st = (result.get("stateless") or {}).get("turns") or []
        ratios = [common.ratio(a["ttft_s"], b.get("limit_ttft_s")) for a, b in zip(kv, st) if b.get("limit_ttft_s")]
        ratios = [r for r in ratios if r is not None]
        out["mlxkvd_over_limit_per_turn"] = ratios
        out["mlxkvd_over_limit_median"] = common.median(ratios) if ratios else None
        dec = [common.ratio(a["decode_tps"], b["decode_tps"]) for a, b in zip(kv, st)
               if a["completion_tokens"] > 8 and b["completion_tokens"] > 8]
        dec = [r for r in dec if r is not None]
        out["decode_mlxkvd_over_in_process_median"] = common.median(dec) if dec else None
        mdec = [common.ratio(a["decode_tps"], b["decode_tps"])
                for a, b in zip((result.get("mlx_lm_server") or {}).get("turns") or [], st)
                if a["completion_tokens"] > 8 and b["completion_tokens"] > 8]
        mdec = [r for r in mdec if r is not None]
        out["decode_mlx_lm_server_over_in_process_median"] = common.median(mdec) if mdec else None
    if name == "restart" and workload.restart_after is not None:
        step = workload.restart_after + 1
        out["restart_step"] = step
        out["restart_turn_mlx_lm_server_over_mlxkvd"] = per_step[step]["mlx_lm_server_over_mlxkvd"]
        out["restart_turn_stateless_over_mlxkvd"] = per_step[step]["stateless_over_mlxkvd"]
    if name == "many_chats":
        later = {i + 1 for i, (c, t) in enumerate(workload.schedule) if t > 0}
        for system in SYSTEMS:
            out[f"median_later_turn_ttft_{system}"] = _median_ttft(result, system, later)
        out["later_turns_mlx_lm_server_over_mlxkvd"] = common.ratio(
            out["median_later_turn_ttft_mlx_lm_server"], out["median_later_turn_ttft_mlxkvd"])
        out["later_turns_stateless_over_mlxkvd"] = common.ratio(
            out["median_later_turn_ttft_stateless"], out["median_later_turn_ttft_mlxkvd"])
    if name == "shared_prefix":
        later = range(2, n + 1)
        for system in SYSTEMS:
            out[f"median_ttft_convs_2_on_{system}"] = _median_ttft(result, system, later)
        out["convs_2_on_mlx_lm_server_over_mlxkvd"] = common.ratio(
            out["median_ttft_convs_2_on_mlx_lm_server"], out["median_ttft_convs_2_on_mlxkvd"])
        out["convs_2_on_stateless_over_mlxkvd"] = common.ratio(
            out["median_ttft_convs_2_on_stateless"], out["median_ttft_convs_2_on_mlxkvd"])
    return out


# --- reports ----------------------------------------------------------------------------------


def describe(w: Workload, tokens_of) -> str:
    chats = len(w.chats)
    system_tokens = tokens_of(w.chats[0].system)
    text = (f"{chats} conversation(s), {len(w.schedule)} turns, system prompt ~{system_tokens} tokens "
            f"(first conversation), max_tokens={w.max_tokens}")
    if w.restart_after is not None:
        text += f"; servers restarted before turn {w.restart_after + 1}"
    if w.cache_bytes is not None:
        text += f"; cache budget {w.cache_bytes / 2**20:.1f} MiB for mlxkvd and mlx_lm.server (~{HELD_CONVERSATIONS} conversations)"
    return text + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multiturn", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (< 3 min)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    workload_names = [w for w in args.workloads.split(",") if w]
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}")
    for w in workload_names:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}")

    out: Path = args.out
    workdir = common.start(out, "multiturn")
    started = time.perf_counter()
    default_dir, f32_dir = common.model_dirs()
    ref = common.InProcess(f32_dir)

    # Bytes per token of a KV cache of this model, measured (allocated bytes, float32).
    cache = ref.make_cache()
    probe = ref.render([{"role": "user", "content": "warm up " * 200}])
    ref.generate(probe, 4, cache=cache)  # also the in-process warm-up
    bytes_per_token = common.cache_nbytes(cache) / math.ceil(common.cache_holds(cache) / 256) / 256
    del cache

    sizes = QUICK if args.quick else FULL
    all_workloads = build_workloads(sizes, ref.count, bytes_per_token, lambda m: len(ref.render(m)))
    workloads = {k: all_workloads[k] for k in WORKLOADS if k in workload_names}
    makers = {
        "stateless": lambda: Stateless(ref),
        "mlx_lm_server": lambda: MlxLmServerSystem(f32_dir),
        "mlxkvd": lambda: MlxkvdSystem(default_dir),
    }
    report: dict[str, Any] = {
        "quick": args.quick,
        "systems": systems,
        "meta": {**common.machine_info(), "model": default_dir.name.rsplit("-", 1)[0],
                 "model_dir_mlxkvd": str(default_dir), "model_dir_float32": str(f32_dir),
                 "bytes_per_token": bytes_per_token, "sizes": sizes.__dict__,
                 "tools_in_chat_template": False},
        "workloads": {},
    }
    total = sum(len(w.schedule) for w in workloads.values()) * len(systems)
    copy_stateless = "restart" in workloads and "ide_chat" in workloads and "stateless" in systems
    if copy_stateless:
        total -= len(workloads["restart"].schedule)
    with common.progress(total, "multiturn") as bar:
        for name, workload in workloads.items():
            results: dict[str, Any] = {}
            for system_name in systems:
                if name == "restart" and system_name == "stateless" and copy_stateless:
                    # The same turns as ide_chat: a stateless system has nothing to restart.
                    results["stateless"] = {**report["workloads"]["ide_chat"]["results"]["stateless"],
                                            "copied_from": "ide_chat"}
                    continue
                results[system_name] = run_workload(makers[system_name](), workload, workdir, bar)
            report["workloads"][name] = {
                "description": describe(workload, ref.count),
                "schedule": workload.schedule,
                "max_tokens": workload.max_tokens,
                "restart_after": workload.restart_after,
                "cache_bytes": workload.cache_bytes,
                "notes": workload.notes,
                "results": results,
                "summary": summarize(name, workload, results),
            }
            # A partial report after each workload: a long run that is interrupted keeps it.
            common.write_json(out / "multiturn.partial.json", report)
    report["headline"] = headline(report)
    report["wall_s"] = time.perf_counter() - started
    common.write_json(out / "multiturn.json", report)
    (out / "multiturn.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (out / "multiturn.md").write_text(text)
    plot(report, out / "multiturn.png")
    for kv in workdir.glob("mlxkvd-*/kv"):  # the disk tiers: large, and of no further use
        shutil.rmtree(kv, ignore_errors=True)
    print(text)
    print(f"wrote {out / 'multiturn.json'}, {out / 'multiturn.md'}, {out / 'multiturn.png'} "
          f"in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
