"""The ``mlxkvd`` command: serve, config, install, uninstall. Socket setup, signals and logging
live here.

Signals while serving: SIGTERM and SIGINT stop the daemon (running turns get
``shutdown_grace_s`` to finish, then are cancelled; caches are flushed, the socket removed,
exit 0); SIGHUP re-reads the config file and applies the settings that can change at run time
(see ``Config``), logging the ones that need a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mlxkv.paths import APP_NAME, CONFIG_ENV, CONFIG_NAME, default_config_file

from . import service_unit
from .config import (
    FIELDS,
    RELOADABLE,
    Config,
    add_arguments,
    changed_settings,
    config_file_in_use,
    env_name,
    flag_name,
    load_config,
)

log = logging.getLogger("mlxkvd")

EXIT_ENGINE = 1  # the engine thread died: a restart brings the daemon back
EXIT_USAGE = 2
EXIT_SOCKET = 3  # the socket path cannot be used: too long, not a socket, a live daemon on it
EXIT_MODEL = 4
EXIT_SERVICE = 5  # launchctl / systemctl missing or failed
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    manager = argparse.ArgumentParser(add_help=False)
    manager.add_argument(
        "--print",
        dest="dry_run",
        action="store_true",
        help="show the file and the commands, change nothing",
    )
    manager.add_argument(
        "--manager",
        choices=service_unit.MANAGERS,
        default=service_unit.default_manager(),
        help="launchd (LaunchAgent, macOS) or systemd (user unit, Linux); default: this platform's",
    )
    install = sub.add_parser(
        "install",
        parents=[manager],
        help="run the daemon as a background service, now and at every login",
        description="Write a LaunchAgent (macOS) or systemd user unit (Linux) that runs "
        "`mlxkvd serve`, and start it. Settings given as flags or MLXKV_* variables are "
        "written into the service's command line; the config file is read by the service.",
    )
    add_arguments(install)
    sub.add_parser("uninstall", parents=[manager], help="stop the background service and remove it")
    return parser


def _print_config(config: Config, sources: dict[str, str]) -> None:
    width = max(len(n) for n in FIELDS)
    for name in FIELDS:
        value = getattr(config, name)
        if name == "socket":
            value = config.socket_path()
        note = "reloadable" if name in RELOADABLE else "restart to change"
        print(f"{name:<{width}}  {value!s:<48}  ({sources[name]}; env {env_name(name)}; {note})")


# --- serve --------------------------------------------------------------------------------


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


def serve(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code.

    ``load`` re-reads the configuration on SIGHUP (None: SIGHUP only logs).
    """
    from . import blas

    # Before mlx is imported: the loader only honours LD_PRELOAD at process start.
    blas.ensure_preloaded(config.cache_dir)

    signals = _Signals()
    signals.install()

    from .socketfile import SocketError, claim

    socket_path = config.socket_path().absolute()
    try:
        socket_claim = claim(socket_path)
    except SocketError as exc:
        log.error("%s", exc)
        return EXIT_SOCKET

    from .conversations import ConversationRegistry
    from .convert import ModelUnavailableError
    from .engine import Engine
    from .errors import ModelLoadError
    from .kvcache import MlxCacheOps
    from .runtime import load_runtime
    from .server import create_server
    from .store import CacheStore

    service_unit.notify(f"STATUS=loading {config.model or 'the default model'}")
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
    engine = Engine(
        runtime,
        store,
        ConversationRegistry(config.max_conversations),
        write_behind_delay_s=config.write_behind_delay_s,
        idle_unload_s=config.idle_unload_s,
        cache_ttl_s=config.cache_ttl_s,
    )
    engine.start()
    server, health, service = create_server(
        engine,
        socket_claim.bind_path,  # gRPC unlinks the path it bound when it stops: not the public one
        default_max_tokens=config.default_max_tokens,
        max_message_bytes=config.max_message_bytes,
    )
    service.socket_path = str(socket_path)
    server.start()
    socket_claim.publish()  # the socket appears at socket_path now, the one release() may remove
    log.info("serving %s on unix://%s (pid %d)", runtime.name, socket_path, os.getpid())
    # Under systemd (Type=notify), `systemctl start` returns now. Same PID as ExecStart started:
    # the BLAS re-exec keeps it, so NotifyAccess=main accepts the message.
    service_unit.notify(f"READY=1\nSTATUS=serving {runtime.name} on {socket_path}")

    apply: dict[str, Callable[[Any], None]] = {
        "log_level": lambda level: logging.getLogger().setLevel(level),
        "max_cache_bytes": engine.set_memory_budget,
        "default_max_tokens": lambda n: setattr(service, "default_max_tokens", n),
        "cache_ttl_s": engine.set_cache_ttl,
        "idle_unload_s": engine.set_idle_unload,
    }
    assert set(apply) == RELOADABLE, "every reloadable setting needs a way to apply it"
    while not signals.stop:
        signals.wake.wait(1.0)
        signals.wake.clear()
        if signals.reload and not signals.stop:
            signals.reload = False
            if load is None:
                log.info("received SIGHUP; there is no configuration to reload")
            else:
                log.info("received SIGHUP, reloading the configuration")
                config = reload_config(config, load, apply)
        if not engine.alive:
            log.critical("stopping: the engine died (see above); the service manager restarts the daemon")
            break

    started = time.monotonic()
    service_unit.notify("STOPPING=1\nSTATUS=stopping")
    health.enter_graceful_shutdown()
    # New turns are refused; in-flight ones get the grace period to finish, then are cancelled.
    engine.stop(grace_s=config.shutdown_grace_s)
    server.stop(grace=1.0).wait()
    socket_claim.release()
    log.info("stopped in %.1f s", time.monotonic() - started)
    return 0 if engine.alive else EXIT_ENGINE


# --- install / uninstall ------------------------------------------------------------------


def _flag_value(value: Any) -> str:
    return str(value.absolute()) if isinstance(value, Path) else str(value)


def service_spec(config: Config, sources: dict[str, str], config_file: Path | None) -> service_unit.ServiceSpec:
    """The service's command line for this configuration.

    Settings given as flags or environment variables here are written into the command line
    (launchd and systemd do not see this shell's environment); settings from the config file
    are left to the file, so that editing it and sending SIGHUP, or restarting, takes effect.
    The socket goes into the service's environment as MLXKV_SOCKET.
    """
    argv = [*service_unit.daemon_executable(), "serve"]
    if config_file is not None:
        argv += ["--config", str(config_file.absolute())]
    for name in FIELDS:
        if name != "socket" and sources[name].startswith(("flag", "env")):
            argv += [flag_name(name), _flag_value(getattr(config, name))]
    return service_unit.ServiceSpec(
        argv=tuple(argv),
        socket=config.socket_path().absolute(),
        home=Path.home(),
        shutdown_grace_s=config.shutdown_grace_s,
        no_restart_exit_codes=(EXIT_USAGE, EXIT_MODEL),
    )


def _carry_out(plan: service_unit.Plan, dry_run: bool) -> int:
    if dry_run:
        sys.stdout.write(service_unit.describe(plan))
        return 0
    errors = service_unit.perform(plan, sys.stdout)
    for error in errors:
        print(f"mlxkvd: error: {error}", file=sys.stderr)
    return EXIT_SERVICE if errors else 0


def install(args: argparse.Namespace, config: Config, sources: dict[str, str]) -> int:
    from .socketfile import SocketError, check_length

    try:
        check_length(config.socket_path().absolute())
    except SocketError as exc:
        print(f"mlxkvd: error: {exc}", file=sys.stderr)
        return EXIT_SOCKET
    # The default file is found by the service on its own; an explicit one is passed on.
    explicit = args.config is not None or bool(os.environ.get(CONFIG_ENV))
    spec = service_spec(config, sources, config_file_in_use(args) if explicit else None)
    manager_env = _manager_environment(args.manager)
    plan = service_unit.install_plan(args.manager, spec, uid=os.getuid(), environ=manager_env)
    if not explicit and manager_env is not None:
        service_dir = service_unit.config_home(spec.home, manager_env)
        if service_dir != service_unit.config_home(spec.home):
            print(
                f"mlxkvd: the service reads {service_dir / APP_NAME / CONFIG_NAME} (the systemd user "
                f"manager's XDG_CONFIG_HOME), not {default_config_file()}"
            )
    code = _carry_out(plan, args.dry_run)
    if code == 0 and not args.dry_run:
        # systemd (Type=notify) has waited until the daemon serves; launchd starts it and returns.
        when = "" if args.manager == service_unit.SYSTEMD else " once the model is loaded"
        print(f"mlxkvd: the service is installed; the daemon listens on {spec.socket}{when}")
    return code


def _manager_environment(manager: str) -> dict[str, str] | None:
    """For systemd, the user manager's environment (its XDG_CONFIG_HOME places the unit); None
    for launchd, or when systemd cannot be asked: then this shell's environment decides."""
    return service_unit.manager_environment() if manager == service_unit.SYSTEMD else None


def uninstall(args: argparse.Namespace) -> int:
    plan = service_unit.uninstall_plan(
        args.manager, home=Path.home(), uid=os.getuid(), environ=_manager_environment(args.manager)
    )
    if not args.dry_run and not plan.file.exists():
        print(f"mlxkvd: not installed ({plan.file} does not exist)")
        return 0
    return _carry_out(plan, args.dry_run)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "uninstall":
        return uninstall(args)
    try:
        config, sources = load_config(args)
    except ValueError as exc:
        # Not a usage error: no usage text, only what is wrong and where it was set.
        print(f"mlxkvd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        _print_config(config, sources)
        return 0
    if args.command == "install":
        return install(args, config, sources)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    return serve(config, load=lambda: load_config(args)[0])


if __name__ == "__main__":
    sys.exit(main())
