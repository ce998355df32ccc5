"""The ``mlxkvd`` command: serve, config. Socket setup, signals and logging live here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import Config, FIELDS, add_arguments, env_name, load_config

log = logging.getLogger("mlxkvd")

EXIT_USAGE = 2
EXIT_SOCKET_IN_USE = 3
EXIT_MODEL = 4
SHUTDOWN_GRACE_S = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxkvd",
        description="The mlxkv daemon: one MLX model and per-conversation KV caches, "
        "served over gRPC on a Unix socket.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    add_arguments(serve)
    config = sub.add_parser("config", help="print the effective configuration and its sources")
    add_arguments(config)
    return parser


def _print_config(config: Config, sources: dict[str, str]) -> None:
    width = max(len(n) for n in FIELDS)
    for name in FIELDS:
        value = getattr(config, name)
        if name == "socket":
            value = config.socket_path()
        print(f"{name:<{width}}  {value!s:<48}  ({sources[name]}; env {env_name(name)})")


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    from . import blas

    # Before mlx is imported: the loader only honours LD_PRELOAD at process start.
    blas.ensure_preloaded(config.cache_dir)

    from .socketfile import SocketError, claim, release

    socket_path = config.socket_path().absolute()
    try:
        claim(socket_path)
    except SocketError as exc:
        log.error("%s", exc)
        return EXIT_SOCKET_IN_USE

    from .conversations import ConversationRegistry
    from .convert import ModelUnavailableError
    from .engine import Engine
    from .errors import ModelLoadError
    from .kvcache import MlxCacheOps
    from .runtime import load_runtime
    from .server import create_server
    from .store import CacheStore

    try:
        runtime = load_runtime(config.model, config.cache_dir, kv_bits=config.kv_bits)
    except (ModelLoadError, ModelUnavailableError) as exc:
        log.error("%s", exc)
        return EXIT_MODEL
    if runtime.backend == "cpu" and sys.platform.startswith("linux") and not blas.is_preloaded():
        log.warning("running without an optimized BLAS: expect about 30x slower prefill")

    store = CacheStore(
        MlxCacheOps(),
        fingerprint=runtime.fingerprint,
        max_bytes=config.max_cache_bytes,
        disk_dir=config.disk_dir() if config.max_disk_bytes > 0 else None,
        max_disk_bytes=config.max_disk_bytes,
        ttl_s=config.cache_ttl_s or None,
    )
    engine = Engine(runtime, store, ConversationRegistry())
    engine.start()
    server, health = create_server(
        engine,
        socket_path,
        default_max_tokens=config.default_max_tokens,
        max_message_bytes=config.max_message_bytes,
    )
    # Another daemon may have won the race for the path between claim() and here.
    server.start()

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving %s on unix://%s (pid %d)", runtime.name, socket_path, os.getpid())

    while not stop.wait(1.0):
        if config.cache_ttl_s:
            engine.call(store.expire)

    started = time.monotonic()
    health.enter_graceful_shutdown()
    # New turns are refused; in-flight ones get SHUTDOWN_GRACE_S to finish, then are cancelled.
    engine.stop(grace_s=SHUTDOWN_GRACE_S)
    server.stop(grace=1.0).wait()
    release(socket_path)
    log.info("stopped in %.1f s", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config, sources = load_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "config":
        _print_config(config, sources)
        return 0
    logging.basicConfig(
        level=getattr(logging, config.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
