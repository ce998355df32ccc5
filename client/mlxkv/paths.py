"""Where the daemon's socket and config file live: one rule shared by the daemon and every client.

Socket, first match wins: an explicit path (flag or argument), ``$MLXKV_SOCKET``, the ``socket``
key of the config file, the default under the user's runtime directory
(``$XDG_RUNTIME_DIR/mlxkv`` on Linux, the user cache directory on macOS, which has no per-user
runtime directory).

Config file: ``$MLXKV_CONFIG`` if set (set but empty: no config file), else ``mlxkvd.toml``
in the user config directory. The daemon reads every key of it (``mlxkvd.config``); a client
reads only ``socket``, with the stdlib, so that it never imports the server package.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

APP_NAME = "mlxkv"
SOCKET_ENV = "MLXKV_SOCKET"
CONFIG_ENV = "MLXKV_CONFIG"
SOCKET_NAME = "mlxkvd.sock"
CONFIG_NAME = "mlxkvd.toml"
# sockaddr_un.sun_path: 104 bytes on macOS and the BSDs, 108 on Linux, NUL included.
MAX_SOCKET_PATH = 104 if sys.platform == "darwin" else 108


def default_socket_dir() -> Path:
    """The directory of the default socket; the daemon creates it with mode 0700."""
    if sys.platform == "darwin":
        return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / APP_NAME
    # No runtime directory (a container, root over ssh): a per-user directory in the cache.
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "run"


def default_config_dir() -> Path:
    """The user config directory: ``~/.config/mlxkv`` on Linux, ``~/Library/Application
    Support/mlxkv`` on macOS."""
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def default_config_file() -> Path:
    """``mlxkvd.toml`` in the user config directory."""
    return default_config_dir() / CONFIG_NAME


def config_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """The config file to read when no ``--config`` is given, or None for none at all.

    ``$MLXKV_CONFIG`` overrides the default location; set to the empty string, it turns the
    config file off (a test, or a one-off run that must ignore the user's settings).
    """
    environ = os.environ if environ is None else environ
    if CONFIG_ENV in environ:
        value = environ[CONFIG_ENV]
        return Path(value).expanduser() if value else None
    return default_config_file()


def anchor(value: str | os.PathLike, config_path: Path) -> Path:
    """A path written in a config file: ``~`` expanded, relative to the file's directory.

    Relative to the file rather than to the working directory, so that a daemon started by
    launchd (working directory ``/``) and a client started anywhere read the same path.
    """
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_path.parent.absolute() / path


def socket_from_config(values: Mapping[str, Any], config_path: Path) -> Path | None:
    """The ``socket`` setting of a parsed config file, or None if it has none."""
    value = values.get("socket")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"socket must be a string path, got {value!r}")
    return anchor(value, config_path)


def _config_socket() -> Path | None:
    """The client's view of the config file: its ``socket`` key, or None.

    A file the daemon would reject is not the client's to report: it is skipped with a
    warning, and the daemon's own error says what is wrong with it.
    """
    path = config_file()
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            return socket_from_config(tomllib.load(fh), path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        log.warning("ignoring the socket setting of %s: %s", path, exc)
        return None


def default_socket_path() -> Path:
    """The socket path when neither a flag, ``$MLXKV_SOCKET`` nor the config file names one."""
    return default_socket_dir() / SOCKET_NAME


def resolve_socket_path(explicit: str | os.PathLike | None = None) -> Path:
    """The socket path a client should connect to (the daemon's rule: see ``mlxkvd.config``)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env).expanduser()
    return _config_socket() or default_socket_path()


def grpc_target(socket_path: str | os.PathLike) -> str:
    """The gRPC channel target for a Unix socket path."""
    return f"unix://{os.path.abspath(socket_path)}"
