"""The ``mlxkvd`` command: serve, config, install, uninstall, api-key. The daemon's life itself
(socket, signals, startup and shutdown) is ``lifecycle.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mlxkv.paths import APP_NAME, CONFIG_ENV, CONFIG_NAME, default_config_file

from . import service_unit
from .config import (
    FIELDS,
    RELOADABLE,
    Config,
    add_arguments,
    config_file_in_use,
    env_name,
    flag_name,
    load_config,
)

log = logging.getLogger("mlxkvd")

from .lifecycle import EXIT_HTTP, EXIT_MODEL, EXIT_SOCKET

EXIT_USAGE = 2
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
    api_key = sub.add_parser(
        "api-key",
        help="print the HTTP APIs' key (making one if there is none)",
        description="Print the key that clients of `mlxkvd serve --http` send (Authorization: "
        "Bearer KEY, or x-api-key: KEY). The first use makes a random one, in a file only you "
        "can read (--http-api-key-file).",
    )
    add_arguments(api_key)
    return parser


def _print_config(config: Config, sources: dict[str, str]) -> None:
    width = max(len(n) for n in FIELDS)
    for name in FIELDS:
        value = getattr(config, name)
        if name == "socket":
            value = config.socket_path()
        note = "reloadable" if name in RELOADABLE else "restart to change"
        print(f"{name:<{width}}  {value!s:<48}  ({sources[name]}; env {env_name(name)}; {note})")


# --- install / uninstall ------------------------------------------------------------------


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):  # --context-length
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value.absolute()) if isinstance(value, Path) else str(value)


def service_spec(config: Config, sources: dict[str, str], config_file: Path | None) -> service_unit.ServiceSpec:
    """The service's command line for this configuration.

    Settings given as flags or environment variables here are written into the command line
    (launchd and systemd do not see this shell's environment); settings from the config file
    are left to the file, so that editing it and sending SIGHUP, or restarting, takes effect.
    The socket goes into the service's environment as MLXKV_SOCKET. With the HTTP gateway on,
    the API key file is pinned to the one this shell finds.
    """
    argv = [*service_unit.daemon_executable(), "serve"]
    if config_file is not None:
        argv += ["--config", str(config_file.absolute())]
    for name in FIELDS:
        if name != "socket" and sources[name].startswith(("flag", "env")):
            value = getattr(config, name)
            if FIELDS[name].metadata["switch"]:
                argv += [flag_name(name)] if value else []
            else:
                argv += [flag_name(name), _flag_value(value)]
    if config.http and sources["http_api_key_file"] == "default":
        # Pinned: the service manager's XDG_CONFIG_HOME may not be this shell's, and
        # `mlxkvd api-key` run here must print the key the service checks.
        argv += [flag_name("http_api_key_file"), str(config.api_key_path().absolute())]
    return service_unit.ServiceSpec(
        argv=tuple(argv),
        socket=config.socket_path().absolute(),
        home=Path.home(),
        shutdown_grace_s=config.shutdown_grace_s,
        no_restart_exit_codes=(EXIT_USAGE, EXIT_MODEL, EXIT_HTTP),
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
    if config.http:
        from .http.server import ListenError, listen_address

        try:
            listen_address(config.http, config.http_allow_any_address)
        except ListenError as exc:  # the service would refuse to start: say so now
            print(f"mlxkvd: error: {exc}", file=sys.stderr)
            return EXIT_HTTP
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


def print_api_key(config: Config) -> int:
    from .http.auth import ApiKeyError, load_key

    try:
        print(load_key(config.api_key_path()))
    except ApiKeyError as exc:
        print(f"mlxkvd: error: {exc}", file=sys.stderr)
        return EXIT_HTTP
    return 0


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
    if args.command == "api-key":
        return print_api_key(config)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    from .lifecycle import serve

    return serve(config, load=lambda: load_config(args)[0])


if __name__ == "__main__":
    sys.exit(main())
