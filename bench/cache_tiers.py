"""Time to first token from each cache tier, and for a new chat that shares a system prompt.

``python -m bench.cache_tiers [--quick]``. On the default model, through the daemon's socket:

- a ~2,000-token conversation gets a ~100-token new message, with its history (a) in memory,
  (b) restored from the disk tier after the daemon restarted, (c) prefilled from scratch
  (a conversation with a history of the same size that no cache holds);
- a new conversation sharing a ~1,000-token system prompt with tools with an existing one:
  its first turn against a cold first turn (a system prompt nobody has seen).

Each figure is the median of several repetitions with fresh conversations; times are measured
by the client, from sending the request to the first text delta.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import common
from bench.textgen import TextMaker

MAX_TOKENS = 16


def _first_delta_s(conv, text: str, **kw):
    """(client-side seconds to the first text delta, Turn)."""
    started = time.perf_counter()
    first: list[float] = []

    def on_text(_):
        if not first:
            first.append(time.perf_counter())

    turn = conv.send(text, max_tokens=MAX_TOKENS, on_text=on_text, **kw)
    return (first[0] if first else time.perf_counter()) - started, turn


def _history(maker: TextMaker, target_tokens: int, count) -> list[dict]:
    """A system prompt and user/assistant exchanges totalling about ``target_tokens``."""
    messages = [{"role": "system", "content": maker.system_prompt(150)}]
    while sum(count(m["content"]) + 5 for m in messages) < target_tokens:
        messages.append({"role": "user", "content": maker.user_message(120)})
        messages.append({"role": "assistant", "content": maker.prose(100)})
    return messages


def _wait_persisted(client, entries: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        disk = next(t for t in client.status().cache_tiers if t.name == "disk")
        if disk.entries >= entries:
            return
        time.sleep(0.2)
    raise TimeoutError("the disk tier did not receive the caches")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller history, fewer repetitions")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    common.ensure_blas()
    common.exit_on_sigterm()

    from mlxkv import Client

    history_tokens = 600 if args.quick else 2000
    system_tokens = 400 if args.quick else 1000
    repeat = args.repeat or (1 if args.quick else 3)

    default_dir, _ = common.model_dirs()
    from mlx_lm import load

    _, tokenizer = load(str(default_dir))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731

    work = common.short_socket_dir()
    daemon = common.DaemonProcess(
        work / "d.sock", work / "cache", args.out / "cache_tiers-daemon.log",
    )
    # The daemon's cache dir is private to this run; the model is converted there once.
    figures: dict[str, list[float]] = {k: [] for k in ("memory", "disk", "scratch", "shared", "cold")}
    reused: dict[str, list[int]] = {k: [] for k in figures}
    try:
        daemon.start()
        bar = common.progress(repeat * 5, "cache tiers")
        for rep in range(repeat):
            maker = TextMaker(1000 + rep, count)
            new_message = maker.user_message(100)
            with Client(daemon.socket_path) as client:
                # (a) memory and (b) disk: two conversations with the same-sized histories.
                convs = {}
                for name in ("memory", "disk"):
                    conv = client.conversation()
                    history = _history(TextMaker(2000 + rep * 10 + len(name), count), history_tokens, count)
                    conv.reset(history)
                    conv.send("Go on.", max_tokens=MAX_TOKENS)
                    convs[name] = conv
                seconds, turn = _first_delta_s(convs["memory"], new_message)
                figures["memory"].append(seconds)
                reused["memory"].append(turn.cached_tokens)
                bar.update()
                _wait_persisted(client, 2)
                daemon.restart()
                bar.update()
                seconds, turn = _first_delta_s(convs["disk"], new_message)
                assert turn.cache_source == "disk", turn.cache_miss_reason
                figures["disk"].append(seconds)
                reused["disk"].append(turn.cached_tokens)
                bar.update()
                # (c) scratch: a history of the same size that no cache holds.
                conv = client.conversation()
                history = _history(TextMaker(3000 + rep, count), history_tokens, count)
                conv.reset(history)
                seconds, turn = _first_delta_s(conv, new_message)
                figures["scratch"].append(seconds)
                reused["scratch"].append(turn.cached_tokens)
                bar.update()
                # Shared system prompt + tools, against a cold first turn.
                tools = maker.tools(system_tokens // 3)
                shared_system = maker.system_prompt(system_tokens, tools)
                client.conversation(system=shared_system).send(maker.user_message(50), max_tokens=MAX_TOKENS)
                seconds, turn = _first_delta_s(
                    client.conversation(system=shared_system), maker.user_message(50)
                )
                figures["shared"].append(seconds)
                reused["shared"].append(turn.cached_tokens)
                cold_system = TextMaker(4000 + rep, count).system_prompt(
                    system_tokens, TextMaker(5000 + rep, count).tools(system_tokens // 3)
                )
                seconds, turn = _first_delta_s(client.conversation(system=cold_system), maker.user_message(50))
                figures["cold"].append(seconds)
                reused["cold"].append(turn.cached_tokens)
                bar.update()
        bar.close()
    finally:
        daemon.stop()

    med = {k: common.median(v) for k, v in figures.items()}
    rows = [
        ("(a) from memory", med["memory"], common.median(reused["memory"]), common.ratio(med["memory"], med["scratch"])),
        ("(b) from disk, after a restart", med["disk"], common.median(reused["disk"]), common.ratio(med["disk"], med["scratch"])),
        ("(c) prefilled from scratch", med["scratch"], common.median(reused["scratch"]), 1.0),
        ("new chat, shared system prompt + tools", med["shared"], common.median(reused["shared"]), common.ratio(med["shared"], med["cold"])),
        ("new chat, cold", med["cold"], common.median(reused["cold"]), 1.0),
    ]
    table = common.markdown_table(
        ["turn", "time to first token (s)", "tokens reused", "ratio to its baseline"], rows
    )
    title = (
        f"Cache tiers: ~{history_tokens}-token history + ~100-token message; "
        f"~{system_tokens}-token shared system prompt; median of {repeat}"
    )
    print(f"\n{title}\n\n{table}\n")
    print("ratios: (a) and (b) against (c); the shared-prefix first turn against the cold one")
    common.write_json(
        args.out / "cache_tiers.json",
        {"machine": common.machine_info(), "history_tokens": history_tokens,
         "system_tokens": system_tokens, "repeat": repeat, "seconds": figures,
         "tokens_reused": reused, "median_s": med,
         "disk_over_scratch": common.ratio(med["disk"], med["scratch"]),
         "shared_over_cold": common.ratio(med["shared"], med["cold"])},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
