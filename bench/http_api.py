"""The HTTP gateway against the socket and against mlx_lm.server: ``python -m bench.http_api``.

One run, the same weights everywhere (the default model dequantized to float32, OpenBLAS
preloaded), every server started by this process on 127.0.0.1 with ``mlxkvd serve --http``.

overhead   What the OpenAI API costs over the socket. One daemon; the same cached turn goes
           through three clients, interleaved turn by turn in rotating order: the ``mlxkv``
           client (gRPC on the Unix socket), the official ``openai`` SDK (streamed, one
           kept-alive client, ``prompt_cache_key``) and plain HTTP (the same JSON body on one
           kept-alive ``http.client`` connection: the gateway without the SDK). Each client has
           its own conversations, in blocks: a system prompt with tools (its cache shared by
           every block), one unmeasured turn, then ``--block-turns`` measured turns that each
           add a one-sentence user message and generate one token, greedy, so that the first
           token is the turn's work (~30 new tokens onto the cached history) plus everything
           around it. TTFT is client side: from the call to the first delta carrying a token
           (gRPC) or the first streamed chunk (HTTP); the SDK's is also taken from the moment it
           hands the request to its HTTP client. On the default model and on the one-layer
           random-weight model of ``bench.models`` (same tokenizer and template), whose first
           token takes a few ms, so that a ms of gateway shows. Target: HTTP - gRPC <= 2 ms at
           the median.

ide_chat   mlxkvd's OpenAI API against mlx_lm.server's, the same client code (the ``openai``
           SDK, streamed, full history every turn, no session key: IDE clients send none). A
           system prompt with tool definitions of ``--size`` tokens (``bench.gpu_ide_chat``'s
           workload), then ``--turns`` turns of 273-568 user tokens, ``--max-tokens`` generated,
           greedy; turn 1 is cold. Per turn the servers go one after the other (order swapped
           every turn), and after mlxkvd's turn the benchmark waits for its write-behind to disk
           (it runs when the daemon is idle, which here would be during mlx_lm.server's turn).
           TTFT: from the call to the first chunk with text; beside it, each server process's
           CPU time over the same span. Target: mlxkvd no slower on any cached turn.

restart    Then both servers are stopped (SIGTERM) and started again, and the next turn is
           sent with no warm-up: mlxkvd finds the history's cache in its disk tier (a new
           conversation of the anonymous session pool, from the longest stored prefix), while
           mlx_lm.server prefills the whole history again.

Writes ``http_api.json`` and ``http_api.md`` under ``--out``, with the servers' logs under
``http_api-work/``.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common, models
from bench.http_api_report import TARGET_OVERHEAD_MS, markdown
from bench.textgen import TextMaker

SEED = 20261205
# A kept-alive connection idle this long is opened again before a request (uvicorn closes
# idle connections after 5 s, as httpx's pool expires them).
KEEPALIVE_S = 4.0
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- the clients ------------------------------------------------------------------------------


class OpenAIChat:
    """One ``openai.OpenAI`` client (its connection pool keeps the connection alive) for one
    server; ``turn`` streams a chat completion and times it."""

    def __init__(self, base_url: str, api_key: str, model: str | None = None, pid_of=None):
        import openai

        # The server's process id (re-read: a restarted server has a new one), for its CPU time.
        self.pid_of = pid_of or (lambda: None)

        # The request hook marks when the SDK hands the request to its HTTP client: before it,
        # the SDK builds the request in Python (its cost grows with the number of messages).
        self._sent: float | None = None
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_request]}, timeout=1800)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=1800,
                                    http_client=http_client)
        self.model = model or self.client.models.list().data[0].id

    def _on_request(self, request) -> None:
        self._sent = time.perf_counter()

    def turn(self, messages: Sequence[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        """One streamed turn: time to the first chunk, to the first chunk with text, the end;
        the reply's text and usage."""
        pid = self.pid_of()
        cpu_started = cpu_seconds(pid)
        cpu_first_text = None
        started = self._sent = time.perf_counter()
        stream = self.client.chat.completions.create(
            model=self.model, messages=list(messages), max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, **extra)
        first = first_text = None
        text, usage, finish = "", None, None
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                first = first or now
                if choice.delta.content:
                    if first_text is None:
                        first_text, cpu_first_text = now, cpu_seconds(pid)
                    text += choice.delta.content
                finish = choice.finish_reason or finish
        end = time.perf_counter()
        prompt = usage.prompt_tokens if usage else None
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        return {
            "ttft_s": (first or end) - started, "ttft_text_s": (first_text or end) - started,
            "sdk_prepare_s": self._sent - started, "ttft_from_sent_s": (first or end) - self._sent,
            "total_s": end - started, "text": text, "finish_reason": finish, "prompt_tokens": prompt,
            "cached_tokens": cached, "prefilled_tokens": prompt - cached if None not in (prompt, cached) else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "server_cpu_to_text_s": (cpu_first_text - cpu_started
                                     if None not in (cpu_first_text, cpu_started) else None),
        }


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


class RawChat:
    """The same streamed request as the SDK's, on one kept-alive ``http.client`` connection
    with no SDK around it: what the gateway costs, without the client's own Python."""

    def __init__(self, base_url: str, api_key: str, model: str):
        host, _, rest = base_url.removeprefix("http://").partition("/")
        self.prefix = "/" + rest
        self.host, self.port = host.rsplit(":", 1)
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.model = model
        self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=1800)
        self.last_used = 0.0

    def turn(self, messages: Sequence[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra})
        if time.monotonic() - self.last_used > KEEPALIVE_S:
            self.conn.close()  # the server may have closed it: reconnect (outside the timing)
            self.conn.connect()
        started = time.perf_counter()
        self.conn.request("POST", self.prefix + "/chat/completions", body, self.headers)
        response = self.conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read()[:500]!r}")
        first, text, usage = None, "", {}
        while line := response.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            first = first or time.perf_counter()
            event = json.loads(data)
            usage = event.get("usage") or usage
            text += "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or ())
        response.read()  # the end of the chunked body: the connection is reused
        end = time.perf_counter()
        self.last_used = time.monotonic()
        prompt, cached = usage.get("prompt_tokens"), (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return {"ttft_s": (first or end) - started, "total_s": end - started, "text": text, "prompt_tokens": prompt,
                "cached_tokens": cached,
                "prefilled_tokens": prompt - cached if None not in (prompt, cached) else None}


def grpc_turn(conv, content: str, max_tokens: int) -> dict[str, Any]:
    """One turn of an ``mlxkv`` Conversation, streamed and timed by the client."""
    ttft, total = common.stream_turn(conv, content, max_tokens)
    t = conv.last_turn
    return {"ttft_s": ttft, "total_s": total, "text": t.text, "prompt_tokens": t.prompt_tokens,
            "cached_tokens": t.cached_tokens, "prefilled_tokens": t.prefill_tokens,
            "completion_tokens": t.completion_tokens, "cache_source": t.cache_source,
            "server_ttft_s": t.time_to_first_token_s}


def start_daemon(model_dir: Path, workdir: Path, name: str, blas_threads: int | None) -> tuple[common.DaemonProcess, str]:
    """``mlxkvd serve --http 127.0.0.1:PORT`` with its key file in ``workdir``; (daemon, base URL)."""
    port = common.free_port()
    set_blas_threads_env(blas_threads)
    daemon = common.DaemonProcess(
        common.short_socket_dir() / f"{name}.sock", workdir / f"{name}-cache", workdir / f"{name}.log",
        model=model_dir,
        extra_args=["--http", f"127.0.0.1:{port}", "--http-api-key-file", str(workdir / f"{name}-api-key")],
    )
    daemon.start(timeout=600)
    return daemon, f"http://127.0.0.1:{port}/v1"


def api_key(workdir: Path, name: str) -> str:
    return (workdir / f"{name}-api-key").read_text().strip()


def set_blas_threads_env(threads: int | None) -> None:
    """OpenBLAS's thread count for the servers started next (they inherit the environment)."""
    if threads is None:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)


# --- overhead ---------------------------------------------------------------------------------


# Each path's user messages start with its own tag (the same number of tokens): identical
# conversations would share their caches (a turn whose own cache diverges at the reply takes
# the longest prefix stored, which would be another path's conversation one turn ahead).
TAGS = {"grpc": "(a)", "http": "(b)", "raw": "(c)"}
ORDERS = list(itertools.permutations(TAGS))


def run_overhead(label: str, model_dir: Path, blocks: int, count_tokens, args, workdir: Path, bar) -> dict[str, Any]:
    """gRPC, OpenAI SDK and plain HTTP TTFT of the same turns on one daemon serving ``model_dir``."""
    from mlxkv import Client

    if len({count_tokens(t + " x") for t in TAGS.values()}) != 1:
        raise RuntimeError(f"the tags {TAGS} must take the same number of tokens")
    daemon, url = start_daemon(model_dir, workdir, f"overhead-{label}", args.blas_threads)
    try:
        key = api_key(workdir, f"overhead-{label}")
        http_clients = {"http": OpenAIChat(url, key)}
        http_clients["raw"] = RawChat(url, key, http_clients["http"].model)
        text = TextMaker(SEED, count_tokens)
        system = text.system_prompt(args.history, text.tools(int(args.history * 0.4)))
        pairs: list[dict[str, Any]] = []
        with Client(daemon.socket_path, timeout=900) as client:
            # Warm-up, not measured: every path, on unrelated text.
            warm = text.prose(200)
            client.ask(warm, max_tokens=2, temperature=0)
            for chat in http_clients.values():
                chat.turn([{"role": "user", "content": warm}], 2)
            for block in range(blocks):
                conv = client.conversation(system=system, max_tokens=1, temperature=0)
                histories = {path: [{"role": "system", "content": system}] for path in http_clients}
                for k in range(args.block_turns + 1):
                    sentence = text.sentence()
                    order = ORDERS[(block * (args.block_turns + 1) + k) % len(ORDERS)]
                    record: dict[str, Any] = {"block": block, "turn": k, "order": order}
                    for path in order:
                        user = f"{TAGS[path]} {sentence}"
                        if path == "grpc":
                            record["grpc"] = grpc_turn(conv, user, 1)
                            continue
                        messages = histories[path]
                        messages.append({"role": "user", "content": user})
                        record[path] = http_clients[path].turn(
                            messages, 1, **({"extra_body": {"prompt_cache_key": f"{path}-{block}"}} if path == "http"
                                            else {"prompt_cache_key": f"{path}-{block}"}))
                        messages.append({"role": "assistant", "content": record[path]["text"]})
                    if k == 0:
                        continue  # the block's first turn: its cache comes from another conversation
                    record["history_tokens"] = record["grpc"]["prompt_tokens"]
                    record["request_messages"] = len(histories["http"]) - 1
                    pairs.append(record)
                    bar.set_postfix_str(f"{label}: gRPC {record['grpc']['ttft_s'] * 1000:.1f} ms, "
                                        f"SDK {record['http']['ttft_s'] * 1000:.1f} ms, "
                                        f"plain HTTP {record['raw']['ttft_s'] * 1000:.1f} ms")
                    bar.update(1)
                client.delete_conversation(conv.conversation_id)
    finally:
        daemon.stop()
    return {"label": label, "model_dir": str(model_dir), "model": http_clients["http"].model,
            "history": args.history, "pairs": pairs, "summary": overhead_summary(pairs)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) with linear interpolation between closest ranks."""
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def bootstrap_median_ci(values: Sequence[float], resamples: int = 2000, seed: int = SEED) -> list[float]:
    """A 95% bootstrap interval of the median: whether a difference is resolved by the noise."""
    rng = random.Random(seed)
    medians = sorted(percentile(rng.choices(values, k=len(values)), 0.5) for _ in range(resamples))
    return [percentile(medians, 0.025), percentile(medians, 0.975)]


def overhead_summary(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    ms = {"grpc": [p["grpc"]["ttft_s"] * 1000 for p in pairs],
          "http": [p["http"]["ttft_s"] * 1000 for p in pairs],
          "http_sent": [p["http"]["ttft_from_sent_s"] * 1000 for p in pairs],
          "sdk_prepare": [p["http"]["sdk_prepare_s"] * 1000 for p in pairs],
          "raw": [p["raw"]["ttft_s"] * 1000 for p in pairs]}
    out: dict[str, Any] = {"n": len(pairs)}
    for path, values in ms.items():
        out[f"{path}_median_ms"] = percentile(values, 0.5)
        out[f"{path}_p90_ms"] = percentile(values, 0.9)
    for path in ("http", "http_sent", "raw"):
        out[f"{path}_minus_grpc_median_ms"] = out[f"{path}_median_ms"] - out["grpc_median_ms"]
        out[f"{path}_minus_grpc_p90_ms"] = out[f"{path}_p90_ms"] - out["grpc_p90_ms"]
        diffs = [h - g for h, g in zip(ms[path], ms["grpc"])]
        out[f"{path}_paired_difference_median_ms"] = percentile(diffs, 0.5)
        out[f"{path}_paired_difference_ci95_ms"] = bootstrap_median_ci(diffs)
    out["prefilled"] = {path: common.median([p[path]["prefilled_tokens"] for p in pairs]) for path in TAGS}
    out["same_prefill"] = sum(len({p[path]["prefilled_tokens"] for path in TAGS}) == 1 for p in pairs)
    out["history_tokens"] = [min(p["history_tokens"] for p in pairs), max(p["history_tokens"] for p in pairs)]
    out["request_messages"] = [min(p["request_messages"] for p in pairs), max(p["request_messages"] for p in pairs)]
    out["met"] = {path: out[f"{path}_minus_grpc_median_ms"] <= TARGET_OVERHEAD_MS for path in ("http", "http_sent", "raw")}
    return out


# --- ide chat and restart ---------------------------------------------------------------------


def settle_s(held_tokens: int) -> float:
    """How long mlxkvd's write-behind may take after a turn: its idle delay (1 s), then about
    0.12 s per 1,000 tokens held (measured; doubled here)."""
    return 1.2 + 0.25 * held_tokens / 1000


def run_ide_chat(default_dir: Path, f32_dir: Path, count_tokens, args, workdir: Path, bar) -> dict[str, Any]:
    from bench import gpu_ide_chat

    system, users = gpu_ide_chat.workload(count_tokens, args.size, args.turns + 1)
    say(f"ide_chat: system prompt {count_tokens(system)} tokens, user messages "
        + ", ".join(str(count_tokens(u)) for u in users))
    set_blas_threads_env(args.blas_threads)
    server = common.MlxLmServer(f32_dir, workdir / "mlx_lm_server.log", cache_size=10)
    daemon, url = start_daemon(default_dir, workdir, "ide-mlxkvd", args.blas_threads)
    turns: list[dict[str, Any]] = []
    try:
        server.start(timeout=600)
        mlxkvd = OpenAIChat(url, api_key(workdir, "ide-mlxkvd"), pid_of=lambda: daemon.pid)
        # mlx_lm.server's name for the model it was started with.
        mlx_lm = OpenAIChat(f"http://127.0.0.1:{server.port}/v1", "none", model="default_model",
                            pid_of=lambda: server.pid)
        clients = {"mlxkvd": mlxkvd, "mlx_lm_server": mlx_lm}
        for name, chat in clients.items():  # warm-up, not measured
            t0 = time.perf_counter()
            chat.turn([{"role": "user", "content": "Say hi."}], 4)
            say(f"{name} warm-up: {time.perf_counter() - t0:.2f} s")
        histories = {name: [{"role": "system", "content": system}] for name in clients}

        def one_turn(k: int, user: str) -> dict[str, Any]:
            order = ("mlxkvd", "mlx_lm_server") if k % 2 else ("mlx_lm_server", "mlxkvd")
            record: dict[str, Any] = {"turn": k, "order": order}
            for name in order:
                histories[name].append({"role": "user", "content": user})
                r = clients[name].turn(histories[name], args.max_tokens)
                histories[name].append({"role": "assistant", "content": r["text"]})
                record[name] = r
                say(f"turn {k} {name}: TTFT {r['ttft_text_s'] * 1000:.0f} ms, prompt {r['prompt_tokens']}, "
                    f"reused {r['cached_tokens']}")
                bar.update(1)
                if name == "mlxkvd":
                    time.sleep(settle_s(r["prompt_tokens"] or 0))
            record["same_reply"] = record["mlxkvd"]["text"] == record["mlx_lm_server"]["text"]
            record["mlx_lm_server_over_mlxkvd"] = common.ratio(record["mlx_lm_server"]["ttft_text_s"],
                                                               record["mlxkvd"]["ttft_text_s"])
            record["cpu_mlx_lm_server_over_mlxkvd"] = common.ratio(record["mlx_lm_server"].get("server_cpu_to_text_s"),
                                                                   record["mlxkvd"].get("server_cpu_to_text_s"))
            return record

        for k, user in enumerate(users[:-1], start=1):
            turns.append(one_turn(k, user))
        say("restarting both servers")
        t0 = time.perf_counter()
        daemon.restart()
        restart_mlxkvd_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        server.restart()  # on a new port
        restart_server_s = time.perf_counter() - t0
        clients["mlx_lm_server"] = OpenAIChat(f"http://127.0.0.1:{server.port}/v1", "none", model="default_model",
                                              pid_of=lambda: server.pid)
        restart = one_turn(len(users), users[-1])
        restart["restart_s"] = {"mlxkvd": restart_mlxkvd_s, "mlx_lm_server": restart_server_s}
    finally:
        server.stop()
        daemon.stop()
    cached = turns[1:]
    ratios = [t["mlx_lm_server_over_mlxkvd"] for t in cached]
    cpu_ratios = [t.get("cpu_mlx_lm_server_over_mlxkvd") for t in cached if t.get("cpu_mlx_lm_server_over_mlxkvd")]
    return {
        "size": args.size, "system_tokens": count_tokens(system), "max_tokens": args.max_tokens,
        "user_tokens": [count_tokens(u) for u in users], "model": mlxkvd.model, "turns": turns, "restart": restart,
        "summary": {
            "cached_turn_ratio_min": min(ratios, default=None), "cached_turn_ratio_max": max(ratios, default=None),
            "cached_turn_ratio_median": common.median(ratios),
            "mlxkvd_no_slower_every_cached_turn": all(r is not None and r >= 1 for r in ratios) if ratios else None,
            "restart_ratio": restart["mlx_lm_server_over_mlxkvd"],
            "cached_turn_cpu_ratio_min": min(cpu_ratios, default=None),
            "cached_turn_cpu_ratio_max": max(cpu_ratios, default=None),
            "cached_turn_cpu_ratio_median": common.median(cpu_ratios) if cpu_ratios else None,
            "restart_cpu_ratio": restart.get("cpu_mlx_lm_server_over_mlxkvd"),
        },
    }


# --- report -----------------------------------------------------------------------------------


def rewrite(path: Path, out: Path) -> int:
    """The summaries and the markdown of an earlier run, computed again from its measurements."""
    report = json.loads(path.read_text())
    for o in report.get("overhead", []):
        o["summary"] = overhead_summary(o["pairs"])
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "http_api.json", report)
    (out / "http_api.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_api", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few turns, small prompts (~3 min)")
    parser.add_argument("--parts", default="overhead,ide_chat", help="comma-separated: overhead, ide_chat")
    parser.add_argument("--overhead-models", default="default,tiny",
                        help="comma-separated: default (SmolLM2-135M-Instruct), tiny (one-layer random weights)")
    parser.add_argument("--blocks", type=int, default=10, help="overhead: conversations per path, default model")
    parser.add_argument("--tiny-blocks", type=int, default=20, help="overhead: conversations per path, tiny model")
    parser.add_argument("--block-turns", type=int, default=10, help="overhead: measured turns per conversation")
    parser.add_argument("--history", type=int, default=1000, help="overhead: system prompt tokens")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads of each server (1: on a few shared cores, more threads wait on each other)")
    parser.add_argument("--size", type=int, default=2500, help="ide_chat: system prompt tokens")
    parser.add_argument("--turns", type=int, default=6, help="ide_chat: turns before the restart, the first cold")
    parser.add_argument("--max-tokens", type=int, default=16, help="ide_chat: tokens generated per turn")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: summarize an earlier run's http_api.json again and rewrite the reports")
    args = parser.parse_args(argv)
    if args.from_json:
        return rewrite(args.from_json, args.out)
    if args.quick:
        args.blocks, args.tiny_blocks, args.block_turns, args.history, args.size, args.turns = 2, 2, 5, 400, 600, 3
    parts = [p for p in args.parts.split(",") if p]
    labels = [m for m in args.overhead_models.split(",") if m]
    if set(parts) - {"overhead", "ide_chat"} or set(labels) - {"default", "tiny"}:
        parser.error("unknown part or overhead model")
    if args.turns < 2:
        parser.error("--turns must be >= 2 (the first is cold)")

    out: Path = args.out
    workdir = common.start(out, "http_api")
    from mlx_lm.utils import load_tokenizer

    default_dir, f32_dir = common.model_dirs()
    tokenizer = load_tokenizer(default_dir)
    count_tokens = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    model_dirs = {"default": default_dir}
    if "tiny" in labels and "overhead" in parts:
        model_dirs["tiny"], _ = models.timed_build(common.MODEL_CACHE_DIR / "random-tiny-llama", models.TINY,
                                                   default_dir)
    meta = {**common.machine_info(), "git": common.git_state(), "model_dir_mlxkvd": str(default_dir),
            "model_dir_float32": str(f32_dir)}
    try:
        import importlib.metadata as md

        meta["openai"] = md.version("openai")
    except Exception:  # noqa: BLE001 - informational only
        pass
    report: dict[str, Any] = {"quick": args.quick, "args": vars(args) | {"out": str(out)}, "meta": meta}
    blocks = {"default": args.blocks, "tiny": args.tiny_blocks}
    total = (sum(blocks[m] for m in labels) * args.block_turns if "overhead" in parts else 0) \
        + (2 * (args.turns + 1) if "ide_chat" in parts else 0)
    with common.progress(total, "http_api") as bar:
        if "overhead" in parts:
            report["overhead"] = []
            for label in labels:
                say(f"overhead on the {label} model ({model_dirs[label].name})")
                report["overhead"].append(run_overhead(label, model_dirs[label], blocks[label], count_tokens, args,
                                                       workdir, bar))
                s = report["overhead"][-1]["summary"]
                say(f"overhead {label}: medians gRPC {s['grpc_median_ms']:.2f} ms, plain HTTP {s['raw_median_ms']:.2f} ms, "
                    f"SDK {s['http_median_ms']:.2f} ms")
                common.write_json(out / "http_api.partial.json", report)
        if "ide_chat" in parts:
            report["ide_chat"] = run_ide_chat(default_dir, f32_dir, count_tokens, args, workdir, bar)
    report["wall_s"] = time.perf_counter() - _STARTED
    common.write_json(out / "http_api.json", report)
    (out / "http_api.partial.json").unlink(missing_ok=True)
    text = markdown(report)
    (out / "http_api.md").write_text(text)
    for path in workdir.glob("*-cache"):
        shutil.rmtree(path / "kv", ignore_errors=True)
    print(text)
    say(f"wrote {out / 'http_api.json'} and {out / 'http_api.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
