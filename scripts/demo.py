"""Start a daemon on a private socket, chat with it for a few turns, show what each turn cost."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlxkv import Client, DaemonUnavailableError

SYSTEM = "You are a concise assistant for a software engineer. Answer in one or two sentences."
QUESTIONS = [
    "What is a Unix domain socket?",
    "How is it different from a TCP socket on localhost?",
    "Which file permissions keep other users away from it?",
    "Give me one reason an IDE would prefer it.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", help="an mlx-lm model directory (default: the embedded one)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxkv-demo-"))
    socket_path = workdir / "mlxkvd.sock"
    command = [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(socket_path)]
    if args.model:
        command += ["--model", args.model]
    log_path = workdir / "mlxkvd.log"
    print(f"starting: {' '.join(command[2:])}  (log: {log_path})", flush=True)
    print("the first start converts the embedded model once; later starts take seconds", flush=True)
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(socket_path) as client:
            deadline = time.monotonic() + 600  # the first start converts the model once
            while True:
                try:
                    status = client.wait_ready(timeout=2)
                    break
                except (DaemonUnavailableError, TimeoutError):
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        print(log_path.read_text(), file=sys.stderr)
                        print("mlxkvd did not start; its log is above", file=sys.stderr)
                        return 1
            print(f"\nmodel {status.model} on {status.backend}, weights {status.weights_dtype}\n")
            conversation = client.conversation(system=SYSTEM)
            for i, question in enumerate(QUESTIONS, 1):
                print(f"you> {question}")
                print("model> ", end="", flush=True)
                turn = conversation.send(
                    question,
                    max_tokens=args.max_tokens,
                    on_text=lambda text: print(text, end="", flush=True),
                )
                print(
                    f"\n  [turn {i}: prompt {turn.prompt_tokens} tokens = "
                    f"{turn.cached_tokens} reused ({turn.cache_source}) + "
                    f"{turn.prefill_tokens} prefilled; generated {turn.completion_tokens}; "
                    f"first token after {turn.time_to_first_token_s:.2f} s; "
                    f"decode {turn.decode_tokens_per_s:.1f} tok/s]\n",
                    flush=True,
                )
            saved = client.status().tokens_saved
            print(f"{saved} prompt tokens were reused instead of prefilled again.")
            # Leave no cache behind on disk: a second run would start from this one's prefix
            # (the disk tier outlives the daemon) and show less of the accounting above.
            client.delete_conversation(conversation.conversation_id)
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


if __name__ == "__main__":
    sys.exit(main())
