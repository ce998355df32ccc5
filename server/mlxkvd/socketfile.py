"""The daemon's side of the Unix socket: a private directory, stale and live sockets."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from mlxkv.paths import MAX_SOCKET_PATH


class SocketError(RuntimeError):
    """The socket path cannot be used; the message says why and what to do."""


def check_length(path: Path) -> None:
    size = len(os.fsencode(str(path)))
    if size >= MAX_SOCKET_PATH:
        raise SocketError(
            f"socket path {path} is {size} bytes; this platform allows at most "
            f"{MAX_SOCKET_PATH - 1}. Choose a shorter --socket path."
        )


def prepare_directory(directory: Path) -> None:
    """Create the socket's directory with mode 0700, or tighten an existing one we own."""
    # The parents too, whatever the umask: a world-writable parent would let another user
    # swap the socket's directory for one of theirs.
    old = os.umask(0o077)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise SocketError(f"{directory} belongs to another user; refusing to put a socket there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def is_live(path: Path, timeout: float = 1.0) -> bool:
    """True if a process accepts connections on the socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        # EACCES: someone's socket we cannot even try; treat it as in use.
        return exc.errno == errno.EACCES or isinstance(exc, TimeoutError)
    finally:
        s.close()


def claim(path: Path) -> None:
    """Make ``path`` ready for bind: refuse a live daemon, remove a stale socket."""
    check_length(path)
    prepare_directory(path.parent)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if is_live(path):
        raise SocketError(f"another mlxkvd is already serving on {path}")
    os.unlink(path)


def release(path: Path) -> None:
    """Remove the socket at shutdown (a missing one is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
