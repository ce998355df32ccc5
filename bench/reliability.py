"""Reliability figures of mlxkvd under load, cancellation and a long soak (issue #6).

    python -m bench.reliability [--clients 8] [--turns 5] [--max-tokens 16]
                                [--cancels 10] [--soak-turns 500] [--skip concurrency,cancel,soak]

Each scenario starts its own `mlxkvd serve` on the default model and talks to it over its
Unix socket with the client library, from separate processes where the issue asks for it:

- concurrency: N client processes, each holding its own multi-turn greedy conversation at the
  same time; turns/s, tokens/s and time to first token (p50/p95, seen by the client, queueing
  included) under that load, next to one client alone;
- cancel: a stream closed after a few deltas, repeatedly; tokens the daemon generated after
  the cancel reached it (from its log line) and after the client stopped reading;
- soak: turns round-robin over 20 conversations with a memory budget of three and a 64 MiB
  disk tier; the daemon's RSS after warm-up (50 turns) and at the end.

Correctness (greedy output equal to mlx-lm without a cache) is the tests' job
(tests/test_concurrency.py, test_cancellation.py, test_soak.py); this script measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlxkv import Client

SYSTEM = "You are a terse assistant. Reply with a few words."
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # float32 KV of SmolLM2-135M
TOPICS = ["cats", "rivers", "bread", "trains", "snow", "copper", "violins", "tea"]

WORKER = r"""
import json, os, sys, time
from mlxkv import Client
socket_path, go, topic, turns, max_tokens, system = sys.argv[1:7]
while not os.path.exists(go):
    time.sleep(0.01)
with Client(socket_path) as client:
    conv = client.conversation(system=system)
    for i in range(int(turns)):
        started = time.perf_counter()
        first = []
        try:
            turn = conv.send(f"Tell me fact {i + 1} about {topic}.", max_tokens=int(max_tokens),
                             on_text=lambda _t: first or first.append(time.perf_counter()))
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            sys.exit(1)
        done = time.perf_counter()
        print(json.dumps({"ttft_s": (first[0] if first else done) - started, "wall_s": done - started,
                          "tokens": turn.completion_tokens, "end": done}), flush=True)
"""


class Daemon:
    def __init__(self, root: Path, name: str, *args: str, cache_dir: Path | None = None):
        self.socket = Path(tempfile.mkdtemp(prefix="mlxkv-rel-")) / f"{name}.sock"
        self.log_path = root / f"{name}.log"
        self.cache_dir = cache_dir or root / f"{name}-cache"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Daemon":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(self.socket),
                 "--cache-dir", str(self.cache_dir), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLXKV_CONFIG": ""},
            )
        with Client(self.socket) as client:
            client.wait_ready(300)
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_clients(daemon: Daemon, n: int, turns: int, max_tokens: int, work: Path) -> dict:
    go = work / f"go-{n}-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(daemon.socket), str(go), TOPICS[i % len(TOPICS)],
             str(turns), str(max_tokens), SYSTEM],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(n)
    ]
    time.sleep(1.0)
    started = time.perf_counter()
    go.touch()
    rows, failures = [], 0
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        for line in out.splitlines():
            row = json.loads(line)
            if "error" in row:
                failures += 1
                print("  client failed:", row["error"], file=sys.stderr)
            else:
                rows.append(row)
        failures += proc.returncode != 0 and not any("error" in json.loads(x) for x in out.splitlines())
    wall = max(r["end"] for r in rows) - started if rows else float("nan")
    ttft = [r["ttft_s"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    return {
        "clients": n, "turns": len(rows), "failed": failures, "wall_s": wall,
        "turns_per_s": len(rows) / wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "turn_p50_s": percentile([r["wall_s"] for r in rows], 50),
    }


def concurrency(root: Path, model: Path, args) -> dict:
    with Daemon(root, "concurrency", "--model", str(model), "--max-disk-bytes", "0") as d:
        run_clients(d, 1, 1, 4, root)  # warm-up
        alone = run_clients(d, 1, args.turns, args.max_tokens, root)
        loaded = run_clients(d, args.clients, args.turns, args.max_tokens, root)
    return {"alone": alone, "loaded": loaded}


CANCELLED = re.compile(r"turn conversation=(\S+) cancelled: generated=(\d+), (\d+) after the cancel")


def cancellation(root: Path, model: Path, args) -> dict:
    after_daemon, after_client = [], []
    with Daemon(root, "cancel", "--model", str(model), "--max-disk-bytes", "0") as d:
        with Client(d.socket) as client:
            for i in range(args.cancels):
                conv = client.conversation(f"cancel-{i}", system=SYSTEM)
                conv.send("Hello!", max_tokens=4)
                received = 0
                stream = conv.stream("Count from 1 to 100, one number per line.", max_tokens=200)
                for _ in stream:
                    received += 1
                    if received == 2 + i % 4:
                        break
                stream.close()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    found = [m for m in CANCELLED.finditer(d.log()) if m[1] == conv.conversation_id]
                    if found:
                        break
                    time.sleep(0.05)
                generated, after = int(found[0][2]), int(found[0][3])
                after_daemon.append(after)
                after_client.append(generated - received)
                assert client.get_conversation(conv.conversation_id).revision == 1
                conv.send("Name a color.", max_tokens=4)  # at once: must not be refused
    return {
        "cancels": args.cancels,
        "after_cancel_max": max(after_daemon), "after_cancel_mean": statistics.mean(after_daemon),
        "after_last_read_max": max(after_client), "after_last_read_mean": statistics.mean(after_client),
    }


def soak(root: Path, model: Path, args) -> dict:
    budget = 3 * 512 * KV_BYTES_PER_TOKEN
    disk_budget = 64 * 1024 * 1024
    rss, started = [], time.perf_counter()
    with Daemon(root, "soak", "--model", str(model), "--max-cache-bytes", str(budget),
                "--max-disk-bytes", str(disk_budget)) as d:
        with Client(d.socket) as client:
            chats = [client.conversation(system=SYSTEM) for _ in range(20)]
            for n in range(args.soak_turns):
                chats[n % 20].send(f"Turn {n}: name a number near {n}.", max_tokens=3)
                rss.append(client.status().rss_bytes)
                if (n + 1) % 50 == 0:
                    print(f"  soak: {n + 1} turns, RSS {rss[-1] / 2**20:.0f} MiB", file=sys.stderr)
            status = client.status()
    tiers = {t.name: t for t in status.cache_tiers}
    warm = rss[min(49, len(rss) - 1)]
    return {
        "turns": args.soak_turns, "failed": status.requests_failed, "wall_s": time.perf_counter() - started,
        "rss_after_warmup_mib": warm / 2**20, "rss_end_mib": rss[-1] / 2**20,
        "rss_max_mib": max(rss[49:] or rss) / 2**20, "memory_budget_mib": budget / 2**20,
        "disk_budget_mib": disk_budget / 2**20, "disk_hits": tiers["disk"].hits,
        "memory_entries_end": tiers["memory"].entries,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cancels", type=int, default=10)
    parser.add_argument("--soak-turns", type=int, default=500)
    parser.add_argument("--skip", default="", help="comma-separated: concurrency,cancel,soak")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    root = Path(tempfile.mkdtemp(prefix="mlxkv-reliability-"))
    from mlxkvd.convert import ensure_default_model

    model = ensure_default_model(root / "model-cache")
    figures: dict = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"}
    if "concurrency" not in skip:
        figures["concurrency"] = c = concurrency(root, model, args)
        a, l = c["alone"], c["loaded"]
        print(f"concurrency: {l['clients']} client processes x {args.turns} turns, max_tokens {args.max_tokens}, greedy")
        print(f"  {l['turns']} turns, {l['failed']} failed, in {l['wall_s']:.1f} s: "
              f"{l['turns_per_s']:.2f} turns/s, {l['tokens_per_s']:.1f} tokens/s "
              f"(one client alone: {a['turns_per_s']:.2f} turns/s, {a['tokens_per_s']:.1f} tokens/s)")
        print(f"  time to first token p50 {l['ttft_p50_s']:.2f} s, p95 {l['ttft_p95_s']:.2f} s "
              f"(alone: p50 {a['ttft_p50_s']:.2f} s, p95 {a['ttft_p95_s']:.2f} s)")
    if "cancel" not in skip:
        figures["cancel"] = c = cancellation(root, model, args)
        print(f"cancellation: {c['cancels']} streams closed mid-answer")
        print(f"  tokens generated after the cancel reached the engine: max {c['after_cancel_max']}, "
              f"mean {c['after_cancel_mean']:.1f}; after the client's last read: max "
              f"{c['after_last_read_max']}, mean {c['after_last_read_mean']:.1f}")
    if "soak" not in skip:
        figures["soak"] = s = soak(root, model, args)
        print(f"soak: {s['turns']} turns over 20 conversations, {s['failed']} failed, in {s['wall_s']:.0f} s; "
              f"memory budget {s['memory_budget_mib']:.0f} MiB, disk budget {s['disk_budget_mib']:.0f} MiB, "
              f"{s['disk_hits']} disk hits")
        print(f"  RSS after 50 turns {s['rss_after_warmup_mib']:.0f} MiB, at the end {s['rss_end_mib']:.0f} MiB, "
              f"max after warm-up {s['rss_max_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
