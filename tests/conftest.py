"""Fixtures: a real daemon process on a real Unix socket, and an in-process mlx-lm reference."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache dir per test session: the converted default model is made once, here."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def model_dir(cache_dir) -> Path:
    from mlxkvd.convert import ensure_default_model

    return ensure_default_model(cache_dir)


def file_size_limited(argv: list[str], limit: int) -> list[str]:
    """``argv`` run with its files limited to ``limit`` bytes (RLIMIT_FSIZE): a ``python -c``
    wrapper sets the limit and execs it. Not Popen's preexec_fn: with it Python forks instead of
    vforking, which runs OpenBLAS's fork handler, and that deadlocks while its threads are busy."""
    code = ("import os, resource, sys; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", code, str(limit), *argv]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout} s")


@contextlib.contextmanager
def served_in_process(runtime, max_bytes: int = 2 << 30):
    """The daemon's pieces built in this process around ``runtime`` (a store, an engine, the
    gRPC server on a fresh Unix socket), so that a test can count their work; yields
    ``(store, socket_path)``."""
    from mlxkvd.conversations import ConversationRegistry
    from mlxkvd.engine import Engine
    from mlxkvd.kvcache import MlxCacheOps
    from mlxkvd.server import create_server
    from mlxkvd.store import CacheStore
    from test_engine_batch import host_for

    store = CacheStore(MlxCacheOps(), fingerprint=runtime.fingerprint, max_bytes=max_bytes)
    engine = Engine(runtime, store, ConversationRegistry())
    engine.start()
    socket_path = Path(tempfile.mkdtemp(prefix="mlxkv-")) / "s.sock"
    server, _, _ = create_server(engine, host_for(engine), socket_path)
    server.start()
    try:
        yield store, socket_path
    finally:
        engine.stop()
        server.stop(grace=1).wait()


def tier(status, name: str):
    """The named cache tier ("memory" or "disk") of a Status."""
    return next(t for t in status.cache_tiers if t.name == name)


def wait_healthy(socket_path: Path, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before it was ready")
        if socket_path.exists():
            with grpc.insecure_channel(f"unix://{socket_path}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        time.sleep(0.1)
    raise TimeoutError(f"daemon on {socket_path} not healthy after {timeout} s")


@dataclass
class Daemon:
    """A real ``mlxkvd serve`` process; restartable on the same socket and cache dir."""

    socket: Path
    cache_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlxkvd", "serve",
                "--socket", str(self.socket),
                "--cache-dir", str(self.cache_dir),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLXKV_CONFIG": ""},
        )
        wait_healthy(self.socket, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> "Daemon":
        self.stop(sig)
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_daemon(tmp_path, cache_dir, model_dir):
    """Factory: ``make_daemon(*extra_args)`` starts a daemon; all are stopped at teardown."""
    daemons: list[Daemon] = []
    # A short directory keeps the socket path under the platform's sun_path limit.
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="mlxkv-"))

    def make(*extra_args: str, cache: Path | None = None) -> Daemon:
        n = len(daemons)
        d = Daemon(
            socket=sock_dir / f"d{n}.sock",
            cache_dir=cache or cache_dir,
            log_path=tmp_path / f"daemon{n}.log",
            extra_args=list(extra_args),
        )
        daemons.append(d)
        return d.start()

    yield make
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory, cache_dir, model_dir):
    """One daemon for a whole test module (tests that do not restart it)."""
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="mlxkv-"))
    d = Daemon(
        socket=sock_dir / "shared.sock",
        cache_dir=cache_dir,
        log_path=tmp_path_factory.mktemp("log") / "daemon.log",
        extra_args=["--max-disk-bytes", "0"],
    ).start()
    yield d
    d.stop()


class Reference:
    """mlx-lm in-process, no cache: the ground truth for greedy output."""

    def __init__(self, model_dir: Path, chat_template: str | None = None):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.utils import dequantize_model

        extra = {"chat_template": chat_template} if chat_template is not None else None
        self.model, self.tokenizer = load(str(model_dir), tokenizer_config=extra)
        if mx.default_device() == mx.cpu:
            dequantize_model(self.model)
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())

    def prompt(self, messages, tools=None) -> list[int]:
        """``tools`` as mlxkv takes them: ``[{"name", "description", "parameters"}]``."""
        tools = [{"type": "function", "function": t} for t in tools] if tools else None
        return list(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))

    def generate(self, messages, max_tokens: int, tools=None) -> list[int]:
        """Greedy token ids, end-of-turn token excluded, from the full prompt and no cache."""
        from mlx_lm import stream_generate

        tokens = []
        for response in stream_generate(
            self.model, self.tokenizer, self.prompt(messages, tools), max_tokens=max_tokens
        ):
            if response.finish_reason == "stop" and response.token in self.tokenizer.eos_token_ids:
                break
            tokens.append(response.token)
        return tokens


@pytest.fixture(scope="session")
def reference(model_dir) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="session")
def tools_reference(model_dir) -> Reference:
    """The reference with the bundled template that renders tools (``--chat-template
    chatml-tools``)."""
    from mlxkvd.runtime import read_chat_template

    return Reference(model_dir, chat_template=read_chat_template("chatml-tools"))


# --- a fake daemon for client tests (each module defines its own ``daemon`` servicer) ---------


def serve_fake(path: Path, servicer) -> "grpc.Server":
    """A gRPC server on a Unix socket with ``servicer`` (an ``InferenceServicer``), started."""
    import grpc
    from concurrent import futures

    from mlxkv.v1 import inference_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "s.sock"


@pytest.fixture
def client(sock: Path, daemon):
    """A client of the module's ``daemon`` fixture."""
    from mlxkv import Client

    with Client(sock, timeout=10, retry_unavailable_s=5.0) as c:
        yield c


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Redirect the CLI's transcript store (platformdirs) into tmp_path."""
    from mlxkv import cli

    target = tmp_path / "data"
    monkeypatch.setattr(cli.platformdirs, "user_data_dir", lambda *a, **k: str(target))
    return target / "conversations"
