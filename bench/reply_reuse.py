"""How often a reply re-tokenizes into other ids: ``python -m bench.reply_reuse``.

The daemon's cache holds the ids a turn generated; the next turn renders the reply's text
through the chat template again. Where that text tokenizes differently (a non-canonical
tokenization by the model, a stop string, a character cut by ``max_tokens``), the next turn
re-prefills from the first differing token. This counts those turns on the default model:
conversations of questions about code and of short prose questions, greedy, each turn's
``cached_tokens`` compared with what the previous turn left in the cache (prompt plus
generated tokens). Writes ``reply_reuse.json`` and ``reply_reuse.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import common
from bench.textgen import TextMaker

SEED = 7
QUESTIONS = [
    "What is a Unix socket?", "Explain a KV cache in two sentences.", "Name three sorting algorithms.",
    "Write a Python function that reverses a string.", "What does HTTP 404 mean?",
    "Give me a haiku about the sea.", "How do I list files in a directory in bash?",
    "What is the capital of Japan?", "Summarize what a mutex does.", "Write a SQL query counting rows.",
    "Translate 'good morning' into French.", "What is 17 times 23?",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reply_reuse", description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", default="24,64,128", help="cycled per turn")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    out: Path = args.out
    workdir = common.start(out, "reply_reuse")
    from mlxkv import Client

    limits = [int(n) for n in args.max_tokens.split(",")]
    default_dir, _ = common.model_dirs()
    reference = common.InProcess(default_dir)
    text = TextMaker(SEED, reference.count)
    daemon = common.DaemonProcess(common.short_socket_dir() / "rr.sock", workdir / "mlxkvd",
                                  workdir / "mlxkvd.log", model=default_dir).start()
    started = time.perf_counter()
    turns = []
    try:
        with Client(daemon.socket_path, timeout=900) as client, \
                common.progress(args.conversations * args.turns, "reply_reuse") as bar:
            for c in range(args.conversations):
                chat = client.conversation(f"rr-{c}", system="You are a helpful coding assistant.")
                held = previous_finish = None
                for t in range(args.turns):
                    if (c + t) % 2:
                        message = text.user_message(text.rng.randint(40, 90))
                    else:
                        message = QUESTIONS[(c * args.turns + t) % len(QUESTIONS)]
                    limit = limits[(c + t) % len(limits)]
                    turn = chat.send(message, max_tokens=limit)
                    if held is not None:
                        turns.append({
                            "conversation": c, "turn": t + 1, "held": held,
                            "cached": turn.cached_tokens, "lost": held - turn.cached_tokens,
                            "previous_finish": previous_finish, "reason": turn.cache_miss_reason,
                        })
                    held = turn.prompt_tokens + turn.completion_tokens
                    previous_finish = turn.finish_reason
                    bar.update(1)
                client.delete_conversation(chat.conversation_id)
    finally:
        daemon.stop()
    missed = [t for t in turns if t["lost"] > 0]
    report = {
        "machine": common.machine_info(),
        "turns": turns,
        "cached_turns": len(turns),
        "turns_with_reply_reprefill": len(missed),
        "rate": len(missed) / len(turns) if turns else None,
        "tokens_reprefilled": sum(t["lost"] for t in missed),
        "seconds": time.perf_counter() - started,
    }
    common.write_json(out / "reply_reuse.json", report)
    rows = [[t["conversation"], t["turn"], t["held"], t["cached"], t["lost"], t["previous_finish"], t["reason"]]
            for t in missed]
    (out / "reply_reuse.md").write_text(
        "# Replies that re-tokenize into other ids (default model, greedy)\n\n"
        f"{len(missed)} of {len(turns)} cached turns re-prefilled part of the previous reply "
        f"({report['tokens_reprefilled']} tokens in all); max_tokens cycled over {limits}.\n\n"
        + (common.markdown_table(["conversation", "turn", "held", "cached", "re-prefilled",
                                  "previous finish", "reason"], rows) + "\n" if rows else "")
    )
    print(f"{len(missed)} of {len(turns)} cached turns re-prefilled part of the previous reply; "
          f"wrote {out / 'reply_reuse.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
