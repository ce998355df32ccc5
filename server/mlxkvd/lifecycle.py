"""The daemon's life: ``Daemon.startup()``, ``run()`` and ``shutdown()``.

``serve`` runs them with ``shutdown`` in a ``finally``, so that whatever fails, wherever,
the daemon undoes exactly what it did: the engine stops (queued turns fail, caches are
flushed to disk), the server stops, and only its own socket and lock file are removed.

Signals while serving: SIGTERM and SIGINT stop the daemon (running turns get
``shutdown_grace_s`` to finish, then are cancelled; exit 0); SIGHUP re-reads the config file
and applies the settings that can change at run time (see ``Config``), logging the ones that
need a restart. If the engine thread dies, the daemon stops with ``EXIT_ENGINE`` so that the
service manager restarts it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from . import service_unit
from .config import RELOADABLE, Config, changed_settings

log = logging.getLogger("mlxkvd")

EXIT_ENGINE = 1  # the engine thread died: a restart brings the daemon back
EXIT_SOCKET = 3  # the socket path cannot be used: too long, not a socket, a live daemon on it
EXIT_MODEL = 4
# The HTTP gateway cannot start: a non-loopback address without --http-allow-any-address, an
# address in use, an API key file that cannot be made or trusted.
EXIT_HTTP = 6


class StartupError(Exception):
    """The daemon cannot start; ``code`` is its exit code, the message says why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Signals:
    """Signal handlers only record what was asked and wake the main loop, which acts on it."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, _frame) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop = True
        self.wake.set()

    def _on_reload(self, _signum, _frame) -> None:
        self.reload = True
        self.wake.set()


def reload_config(
    current: Config,
    load: Callable[[], Config],
    apply: dict[str, Callable[[Any], None]],
) -> Config:
    """Re-read the configuration; apply what can change at run time, log what needs a restart.

    Returns the configuration now in effect. A file that does not load changes nothing.
    """
    try:
        new = load()
    except ValueError as exc:
        log.error("config reload failed, keeping the current configuration: %s", exc)
        return current
    changes = changed_settings(current, new)
    if not changes:
        log.info("config reloaded: nothing changed")
        return current
    applied = {}
    # The log level last: the lines about the other settings go out at the old level.
    for name in sorted(changes, key=lambda n: n == "log_level"):
        old, value = changes[name]
        if name in RELOADABLE:
            log.info("config reloaded: %s %s -> %s", name, old, value)
            apply[name](value)
            applied[name] = value
        else:
            log.warning("config: %s changed (%s -> %s) but needs a restart to take effect", name, old, value)
    return dataclasses.replace(current, **applied)


class Daemon:
    """One daemon: what ``startup`` made, ``shutdown`` takes down (each part only if made)."""

    def __init__(self, config: Config, load: Callable[[], Config] | None = None):
        self.config = config
        self.load = load  # re-reads the configuration on SIGHUP (None: SIGHUP only logs)
        self.socket_path = config.socket_path().absolute()
        self.signals = _Signals()
        self.claim = None
        self.engine = None
        self.models = None
        self.server = None
        self.health = None
        self.service = None
        self.http = None

    def startup(self) -> None:
        """Claim the socket, load the model, start the engine and the server; raises
        ``StartupError`` with the exit code when one of them cannot be done."""
        from .catalog import Catalog
        from .conversations import ConversationRegistry
        from .convert import ModelUnavailableError
        from .engine import Engine
        from .errors import MlxkvError
        from .kvcache import MlxCacheOps
        from .models import ModelHost
        from .server import create_server
        from .socketfile import SocketError, claim
        from .store import CacheStore

        config = self.config
        self.signals.install()
        listen = self._http_listen() if config.http else None  # before the model: fails fast
        try:
            self.claim = claim(self.socket_path)
        except SocketError as exc:
            raise StartupError(EXIT_SOCKET, str(exc)) from None
        service_unit.notify(f"STATUS=loading {config.model or 'the default model'}")
        catalog = Catalog(cache_dir=config.cache_dir, models_dir=config.models_dir)
        try:
            model = config.model
            entry = catalog.resolve(str(model.absolute()) if model and model.is_dir() else str(model or ""))
            loader = _Loader(config, entry)
            runtime = loader(entry)
        except (MlxkvError, ModelUnavailableError) as exc:
            raise StartupError(EXIT_MODEL, str(exc)) from None
        from . import blas

        if runtime.backend == "cpu" and sys.platform.startswith("linux") and not blas.is_preloaded():
            log.warning("running without an optimized BLAS: expect about 30x slower prefill")
        draft = self._draft_model(catalog, loader, runtime) if config.draft_model else None
        store = CacheStore(
            MlxCacheOps(),
            fingerprint=runtime.fingerprint,
            max_bytes=config.max_cache_bytes,
            disk_dir=config.disk_dir() if config.max_disk_bytes > 0 else None,
            max_disk_bytes=config.max_disk_bytes,
            ttl_s=config.cache_ttl_s or None,
        )
        self.engine = Engine(
            runtime,
            store,
            ConversationRegistry(config.max_conversations),
            write_behind_delay_s=config.write_behind_delay_s,
            idle_unload_s=config.idle_unload_s,
            cache_ttl_s=config.cache_ttl_s,
            max_batch=config.max_batch,
            draft=draft,
        )
        self.engine.start()
        self.models = ModelHost(self.engine, catalog, entry, loader, context_caps=config.context_length)
        self.server, self.health, self.service = create_server(
            self.engine,
            self.models,
            self.claim.bind_path,  # gRPC unlinks the path it bound when it stops: not the public one
            default_max_tokens=config.default_max_tokens,
            max_message_bytes=config.max_message_bytes,
        )
        self.service.socket_path = str(self.socket_path)
        self.service.turns.default_speculative = config.speculative
        self.service.turns.draft_model = draft.name if draft is not None else None
        self.server.start()
        self.claim.publish()  # the socket appears at socket_path now, the one release() may remove
        if listen is not None:
            self._start_http(*listen)
        # What startup built (the model, the tokenizer, the modules: ~90K objects) lives as long
        # as the daemon: out of the cyclic collector's way, so that a full collection during a
        # turn scans only what turns made (tens of ms less; vLLM freezes after loading too).
        gc.collect()
        gc.freeze()
        log.info("serving %s on unix://%s (pid %d)", runtime.name, self.socket_path, os.getpid())
        # Under systemd (Type=notify), `systemctl start` returns now. Same PID as ExecStart
        # started: the BLAS re-exec keeps it, so NotifyAccess=main accepts the message.
        service_unit.notify(f"READY=1\nSTATUS=serving {runtime.name} on {self.socket_path}")

    def _draft_model(self, catalog: Any, loader: "_Loader", target: Any) -> Any:
        """The ``--draft-model``, loaded, checked against the model loaded at start;
        ``StartupError`` if it cannot draft for it."""
        from .convert import ModelUnavailableError
        from .drafting import DraftModel
        from .errors import MlxkvError

        path = self.config.draft_model
        try:
            entry = catalog.resolve(str(path.absolute()) if path.is_dir() else str(path))
            draft = DraftModel(loader(entry, template=False), max_bytes=0)
        except (MlxkvError, ModelUnavailableError) as exc:
            raise StartupError(EXIT_MODEL, f"draft model: {exc}") from None
        why = draft.misfit(target)
        if why is not None:
            raise StartupError(EXIT_MODEL, why)
        log.info("draft model %s loaded for speculative decoding", draft.name)
        return draft

    def _http_listen(self) -> tuple[str, int, str]:
        """Where the HTTP gateway listens and its API key; ``StartupError`` if it cannot."""
        from .http.auth import ApiKeyError, load_key
        from .http.server import ListenError, listen_address

        try:
            host, port = listen_address(self.config.http, self.config.http_allow_any_address)
            return host, port, load_key(self.config.api_key_path())
        except (ListenError, ApiKeyError) as exc:
            raise StartupError(EXIT_HTTP, str(exc)) from None

    def _start_http(self, host: str, port: int, api_key: str) -> None:
        """The HTTP gateway, on the gRPC service's ``Turns``: one engine, one store, one registry."""
        from .http.app import create_app
        from .http.gateway import Gateway
        from .http.server import HttpServer, ListenError

        service = self.service
        gateway = Gateway(service.turns, default_max_tokens=lambda: service.default_max_tokens,
                          max_body_bytes=self.config.max_message_bytes)
        server = HttpServer(create_app(gateway, api_key), host, port,
                            shutdown_grace_s=self.config.shutdown_grace_s)
        try:
            server.start()
        except ListenError as exc:
            raise StartupError(EXIT_HTTP, str(exc)) from None
        self.http = server

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (0), or until the engine dies (``EXIT_ENGINE``)."""
        engine, signals = self.engine, self.signals
        apply: dict[str, Callable[[Any], None]] = {
            "log_level": lambda level: logging.getLogger().setLevel(level),
            "max_cache_bytes": engine.set_memory_budget,
            "default_max_tokens": lambda n: setattr(self.service, "default_max_tokens", n),
            "cache_ttl_s": engine.set_cache_ttl,
            "idle_unload_s": engine.set_idle_unload,
            "speculative": lambda mode: setattr(self.service.turns, "default_speculative", mode),
        }
        assert set(apply) == RELOADABLE, "every reloadable setting needs a way to apply it"
        while not signals.stop:
            signals.wake.wait(1.0)
            signals.wake.clear()
            if signals.reload and not signals.stop:
                signals.reload = False
                if self.load is None:
                    log.info("received SIGHUP; there is no configuration to reload")
                else:
                    log.info("received SIGHUP, reloading the configuration")
                    self.config = reload_config(self.config, self.load, apply)
            if not engine.alive:
                log.critical("stopping: the engine died (see above); the service manager restarts the daemon")
                return EXIT_ENGINE
        return 0

    def shutdown(self) -> None:
        """Take down what ``startup`` made, in reverse; every step runs even if one fails."""
        started = time.monotonic()
        if self.server is not None:
            service_unit.notify("STOPPING=1\nSTATUS=stopping")
            self.health.enter_graceful_shutdown()
        steps = []
        if self.http is not None:
            # Before the engine: requests in flight get the grace, new ones are refused.
            steps.append(("stopping the HTTP gateway", self.http.stop))
        if self.engine is not None:
            # New turns are refused; in-flight ones get the grace period, then are cancelled.
            steps.append(("stopping the engine", lambda: self.engine.stop(grace_s=self.config.shutdown_grace_s)))
        if self.server is not None:
            steps.append(("stopping the server", lambda: self.server.stop(grace=1.0).wait()))
        if self.claim is not None:
            steps.append(("releasing the socket", self.claim.release))
        for what, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the other steps must still run
                log.exception("%s failed", what)
        if self.server is not None:
            log.info("stopped in %.1f s", time.monotonic() - started)


class _Loader:
    """Loads a catalogue entry's runtime with the daemon's settings: its KV bits for every
    model, ``--chat-template`` for the model it started with only (a template is written for
    one model family). The default model is converted first if it has not been."""

    def __init__(self, config: Config, first: Any):
        from .runtime import read_chat_template

        self.config = config
        self.first = first.path
        self.template = read_chat_template(config.chat_template) if config.chat_template else None

    def __call__(self, entry: Any, progress: Callable[[float], None] | None = None, *,
                 template: bool = True) -> Any:
        from .convert import ensure_default_model
        from .runtime import ModelRuntime

        path = ensure_default_model(self.config.cache_dir) if entry.source == "default" else entry.path
        # A directory named by path keeps its directory's name, as --model always did.
        name = None if entry.source == "path" else entry.name
        return ModelRuntime(path, name=name, kv_bits=self.config.kv_bits, progress=progress,
                            chat_template=self.template if template and entry.path == self.first else None)


def serve(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    from . import blas

    # Before mlx is imported: the loader only honours LD_PRELOAD at process start.
    blas.ensure_preloaded(config.cache_dir)
    daemon = Daemon(config, load)
    try:
        daemon.startup()
        return daemon.run()
    except StartupError as exc:
        log.error("%s", exc)
        return exc.code
    finally:
        daemon.shutdown()
