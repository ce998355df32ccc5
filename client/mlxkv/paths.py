"""Where the daemon's socket lives: one rule shared by the daemon and every client.

Order: an explicit path (flag or argument), then ``$MLXKV_SOCKET``, then the default under
the user's runtime directory (``$XDG_RUNTIME_DIR/mlxkv`` on Linux, the user cache directory
on macOS, which has no per-user runtime directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "mlxkv"
SOCKET_ENV = "MLXKV_SOCKET"
SOCKET_NAME = "mlxkvd.sock"
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


def resolve_socket_path(explicit: str | os.PathLike | None = None) -> Path:
    """The socket path a daemon should listen on, or a client should connect to."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env).expanduser()
    return default_socket_dir() / SOCKET_NAME


def grpc_target(socket_path: str | os.PathLike) -> str:
    """The gRPC channel target for a Unix socket path."""
    return f"unix://{os.path.abspath(socket_path)}"
