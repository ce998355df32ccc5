"""The `mlxkv` command against a real daemon, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MLXKV = [sys.executable, "-m", "mlxkv.cli"]


def run(args: list[str], tmp_path: Path, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLXKV_CONFIG": "",
        # The CLI keeps transcripts under the user data dir: keep them in the test's tree.
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "HOME": str(tmp_path / "home"),
        **(env or {}),
    }
    return subprocess.run(
        MLXKV + args, input=stdin, capture_output=True, text=True, timeout=300, env=env
    )


def test_chat_streams_several_turns_with_stats(shared_daemon, tmp_path):
    result = run(
        ["--socket", str(shared_daemon.socket), "chat", "--stats", "--max-tokens", "12"],
        tmp_path,
        stdin="What is the capital of France?\nAnd of Italy?\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    stats = [line for line in result.stderr.splitlines() if "prefilled" in line]
    assert len(stats) == 2, result.stderr
    # The second turn reuses the first from the cache.
    assert "from conversation" in stats[1]


def test_ask_continues_a_named_conversation_across_invocations(shared_daemon, tmp_path):
    base = ["--socket", str(shared_daemon.socket)]
    first = run(base + ["ask", "--conversation", "cli-notes", "--stats", "--max-tokens", "8",
                        "Remember the number 42."], tmp_path)
    assert first.returncode == 0, first.stderr
    second = run(base + ["ask", "--conversation", "cli-notes", "--stats", "--max-tokens", "8",
                         "What number did I mention?"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "from conversation" in second.stderr

    listing = run(base + ["conversations", "ls"], tmp_path)
    assert listing.returncode == 0 and "cli-notes" in listing.stdout
    removed = run(base + ["conversations", "rm", "cli-notes"], tmp_path)
    assert removed.returncode == 0, removed.stderr
    again = run(base + ["conversations", "rm", "cli-notes"], tmp_path)
    assert again.returncode == 1 and "no conversation" in again.stderr


def test_status_table_and_json(shared_daemon, tmp_path):
    table = run(["--socket", str(shared_daemon.socket), "status"], tmp_path)
    assert table.returncode == 0, table.stderr
    assert "SmolLM2-135M-Instruct" in table.stdout and "cpu" in table.stdout
    assert "memory" in table.stdout and "disk" in table.stdout
    as_json = json.loads(run(["--socket", str(shared_daemon.socket), "status", "--json"], tmp_path).stdout)
    assert as_json["backend"] == "cpu"
    assert as_json["weightsDtype"] == "float32"


def test_start_launches_a_daemon_that_stays(tmp_path, cache_dir):
    sock = Path(tempfile.mkdtemp(prefix="mlxkv-")) / "started.sock"
    base = ["--socket", str(sock), "--start"]
    env = {"MLXKV_CACHE_DIR": str(cache_dir)}
    pid = None
    try:
        first = run(base + ["ask", "--max-tokens", "4", "Say hi."], tmp_path, env=env)
        started = re.search(r"started mlxkvd \(pid (\d+)\) on (\S+),", first.stderr)
        assert started, first.stderr
        pid = int(started.group(1))
        assert started.group(2) == str(sock)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip()

        # The daemon outlived the client; the next `--start` finds it and starts nothing.
        second = run(base + ["status", "--json"], tmp_path, env=env)
        assert second.returncode == 0, second.stderr
        assert "started mlxkvd" not in second.stderr
        assert json.loads(second.stdout)["requests"] == "1"  # uint64 is a string in JSON
        log = next((tmp_path / "state").rglob("mlxkvd.log")).read_text()
        assert f"on unix://{sock}" in log
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.2)
