"""The daemon as a service manager runs it: SIGTERM with a turn in flight, SIGHUP reloading the
config file, a daemon and clients that meet through the config file alone, `mlxkv status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_healthy

from mlxkv.client import Client, MlxkvError

LONG_PROMPT = "Count from 1 to 5000, one number per line, and never stop early."


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXKV_")}
    return {**env, **extra}


def memory_budget(client: Client) -> int:
    return next(t.budget_bytes for t in client.status().cache_tiers if t.name == "memory")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# --- SIGTERM ------------------------------------------------------------------------------


def test_sigterm_with_a_turn_in_flight_cancels_it_flushes_and_exits_0(make_daemon):
    grace = 1.0
    d = make_daemon("--shutdown-grace-s", str(grace), "--default-max-tokens", "4000")
    streaming = threading.Event()
    outcome: dict[str, object] = {}

    def long_turn() -> None:
        with Client(d.socket, retry_unavailable_s=0) as client:
            conv = client.conversation("long")
            try:
                # Sampled at a high temperature the model rambles: an end-of-turn token is
                # unlikely before the signal, so the turn is still running when it comes.
                outcome["turn"] = conv.send(
                    LONG_PROMPT,
                    on_text=lambda _t: streaming.set(),
                    max_tokens=4000,
                    temperature=2.0,
                    seed=7,
                )
            except MlxkvError as exc:
                outcome["error"] = exc

    worker = threading.Thread(target=long_turn, daemon=True)
    worker.start()
    assert streaming.wait(60), "the turn never started streaming"
    with Client(d.socket) as client:
        assert client.status().active_requests == 1  # in flight when the signal arrives

    sent = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(timeout=grace + 20)
    took = time.monotonic() - sent
    worker.join(10)

    assert code == 0
    assert took < grace + 10, f"stopped in {took:.1f} s"
    assert not d.socket.exists()
    assert not worker.is_alive(), "the client was left hanging"
    log = d.log()
    assert "received SIGTERM, shutting down" in log
    assert f"cancelling turns still running after {grace:.0f} s" in log
    assert "flushed" in log and "cache entries to disk" in log
    # The client saw its turn end: an error (cancelled, or the daemon went away), not an answer.
    assert "error" in outcome, outcome


# --- a daemon configured by its file alone ------------------------------------------------


@pytest.fixture(scope="module")
def file_daemon(cache_dir, model_dir, tmp_path_factory):
    """``mlxkvd serve`` with no flags: socket, cache dir and budgets come from a config file."""
    base = Path(tempfile.mkdtemp(prefix="mlxkv-"))
    config = tmp_path_factory.mktemp("conf") / "mlxkvd.toml"
    text = (
        f'socket = "{base}/f.sock"\ncache_dir = "{cache_dir}"\nmax_disk_bytes = 0\n'
        f'max_cache_bytes = "64MiB"\nlog_level = "INFO"\n'
    )
    config.write_text(text)
    log_path = config.with_name("daemon.log")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxkvd", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(MLXKV_CONFIG=str(config)),
        )
    socket_path = base / "f.sock"
    wait_healthy(socket_path, proc=proc)
    yield {"proc": proc, "config": config, "text": text, "socket": socket_path, "log": log_path}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_mlxkv_status_finds_the_daemon_through_the_same_config_file(file_daemon):
    env = clean_env(MLXKV_CONFIG=str(file_daemon["config"]))
    proc = subprocess.run(
        [sys.executable, "-m", "mlxkv.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    with Client(file_daemon["socket"]) as client:
        status = client.status()
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line and " " in line)
    assert lines["model"].strip() == status.model
    assert lines["backend"].strip() == status.backend
    assert status.backend in ("cpu", "gpu", "metal")
    assert lines["socket"].strip() == str(file_daemon["socket"])
    assert "memory" in proc.stdout  # the cache tiers table


def test_python_client_finds_the_daemon_through_the_config_file(file_daemon, monkeypatch):
    monkeypatch.delenv("MLXKV_SOCKET", raising=False)
    monkeypatch.setenv("MLXKV_CONFIG", str(file_daemon["config"]))
    with Client() as client:
        assert client.socket_path == file_daemon["socket"]
        assert client.status().socket == str(file_daemon["socket"])


def test_sighup_applies_reloadable_settings_and_logs_the_rest(file_daemon):
    proc, config, log_path = file_daemon["proc"], file_daemon["config"], file_daemon["log"]
    with Client(file_daemon["socket"]) as client:
        assert memory_budget(client) == 64 * 1024**2
        client.conversation("").send("Hi", max_tokens=2)
        assert wait_for(lambda: "turn conversation=-" in log_path.read_text())  # INFO is on

        config.write_text(
            file_daemon["text"]
            .replace('"64MiB"', '"32MiB"')
            .replace('"INFO"', '"WARNING"')
            + "default_max_tokens = 7\nkv_bits = 4\n"
        )
        before = len(log_path.read_text())
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: memory_budget(client) == 32 * 1024**2)
        assert wait_for(lambda: "log_level INFO -> WARNING" in log_path.read_text()[before:])
        reload_log = log_path.read_text()[before:]
        assert "config reloaded: max_cache_bytes 67108864 -> 33554432" in reload_log
        assert "config reloaded: default_max_tokens 512 -> 7" in reload_log
        assert "kv_bits changed (0 -> 4) but needs a restart" in reload_log
        # The new default applies to a request that does not say.
        turn = client.conversation("").send("Write a long poem about the sea.")
        assert turn.completion_tokens <= 7

        # WARNING now: the per-turn INFO line is gone.
        before = len(log_path.read_text())
        client.conversation("").send("Hi", max_tokens=2)
        time.sleep(0.5)
        assert "turn conversation=" not in log_path.read_text()[before:]

        # A broken file changes nothing and the daemon goes on.
        config.write_text("max_cache_bytes = [\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "config reload failed, keeping the current configuration" in log_path.read_text())
        assert memory_budget(client) == 32 * 1024**2
        assert proc.poll() is None
    config.write_text(file_daemon["text"])


# --- no daemon ----------------------------------------------------------------------------


def test_mlxkv_status_without_a_daemon_prints_the_hint_and_exits_2(tmp_path):
    missing = tmp_path / "nobody-home.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "mlxkv.cli", "--socket", str(missing), "status"],
        env=clean_env(MLXKV_CONFIG=""), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert f"no mlxkv daemon is answering at {missing} (no socket file)" in proc.stderr
    assert "start one with `mlxkvd serve` (or let `mlxkv --start` do it), or `mlxkvd install`" in proc.stderr
