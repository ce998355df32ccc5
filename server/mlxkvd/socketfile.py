"""The daemon's side of the Unix socket: a private directory, a lock that claims the path, stale
and live sockets.

The rules, so that a daemon never damages what it did not make:

- The socket's directory: a missing one (and its missing parents) is created with mode 0700.
  An existing one is used as it is and never chmod'ed; it must belong to this user and must not
  be writable by group or others, else the daemon refuses to start. A shared directory such as
  /tmp (sticky, world-writable) is refused too: put the socket in a private directory inside it
  instead (``--socket /tmp/mlxkv-$USER/mlxkvd.sock``, which the daemon creates). A symlinked
  directory is judged by its target.
- The path is claimed with ``<socket>.lock`` beside it, created with mode 0600 and held with
  ``flock`` for the daemon's life: of two daemons started on one path, the second refuses to
  start. Only the lock holder removes a stale socket.
- gRPC binds ``.<socket name>.bind`` beside the path, and the lock holder then links the bound
  socket to the path. gRPC unlinks whatever socket is at the path it bound when it stops; that
  name is gone by then, so it cannot take a socket that replaced ours. At shutdown the daemon
  removes the socket at the path only if it is still the one it bound (same device and inode:
  the listening socket keeps its inode allocated, so no other socket can have it), then its lock
  file.
- A lock file left behind by a daemon that died is harmless: the lock goes with the process,
  not with the file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import socket
import stat
from pathlib import Path

from mlxkv.paths import MAX_SOCKET_PATH

log = logging.getLogger(__name__)


class SocketError(RuntimeError):
    """The socket path cannot be used; the message says why and what to do."""


def bind_path(path: Path) -> Path:
    """Where gRPC binds the socket before it is linked to ``path`` (see the module docstring)."""
    return path.with_name(f".{path.name}.bind")


def check_length(path: Path) -> None:
    """SocketError unless ``path`` fits in sun_path with room for the name gRPC binds first."""
    size = len(os.fsencode(str(path)))
    extra = len(bind_path(path).name) - len(path.name)
    limit = MAX_SOCKET_PATH - 1 - extra
    if size > limit:
        raise SocketError(
            f"socket path {path} is {size} bytes; this platform allows at most "
            f"{MAX_SOCKET_PATH - 1} in a socket path, and mlxkvd needs {extra} more for the name "
            f"it binds first ({bind_path(path).name}), so at most {limit}. Choose a shorter "
            f"--socket path."
        )


def prepare_directory(directory: Path) -> None:
    """Create the socket's directory with mode 0700, or check that an existing one is private.

    Only a directory created here gets a mode from this function; an existing one is never
    chmod'ed. Raises ``SocketError`` for a directory of another user, or one that others can
    write to (they could replace the socket).
    """
    # The parents too, whatever the umask: only this user may change what lies under them.
    old = os.umask(0o077)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SocketError(f"cannot create the socket's directory {directory}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    st = directory.stat()  # a symlink's target: that is where the socket goes
    if st.st_uid != os.getuid():
        raise SocketError(
            f"{directory} belongs to another user; refusing to put a socket there. "
            f"Choose a directory of your own (a missing one is created with mode 0700)."
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if st.st_mode & stat.S_ISVTX:
            raise SocketError(
                f"{directory} is a shared directory (writable by others, like /tmp); refusing to "
                f"put a socket there. Use a private directory, e.g. --socket "
                f"{directory / f'mlxkv-{_user()}' / 'mlxkvd.sock'} (created with mode 0700)."
            )
        raise SocketError(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"refusing to put a socket there. Use a private directory (a missing one is created "
            f"with mode 0700), or remove their write access: chmod go-w {directory}"
        )


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


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


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class SocketClaim:
    """This daemon's hold on a socket path: the locked ``<socket>.lock`` and, once published,
    the identity of the socket it bound. Made by ``claim``.

    The server binds ``bind_path``; ``publish()`` then gives that socket its public name.
    """

    def __init__(self, path: Path, lock_path: Path, lock_fd: int) -> None:
        self.path = path
        self.bind_path = bind_path(path)
        self.lock_path = lock_path
        self._lock_fd: int | None = lock_fd
        self._socket: tuple[int, int] | None = None

    def publish(self) -> None:
        """Link the socket just bound at ``bind_path`` to ``path`` and remove the bind name.

        Raises SocketError if something appeared at ``path`` since ``claim`` (never replaced).
        """
        self._socket = _identity(os.lstat(self.bind_path))
        try:
            os.link(self.bind_path, self.path)
        except FileExistsError:
            raise SocketError(f"{self.path} appeared while this daemon was starting; leaving it alone") from None
        finally:
            os.unlink(self.bind_path)

    def release(self) -> None:
        """Remove this daemon's socket if it is still at the path, then the lock file, and
        let go of the lock. Anything else at the path is left alone. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            current = _identity(os.lstat(self.path))
        except FileNotFoundError:
            current = None
        if current is not None and current == self._socket:
            os.unlink(self.path)
        elif current is not None and self._socket is not None:
            log.warning("not removing %s: it is no longer the socket this daemon bound", self.path)
        self._unlock()

    def _unlock(self) -> None:
        assert self._lock_fd is not None
        # Unlink while still holding the lock, and only the file locked: a daemon that opens
        # the old file meanwhile sees it gone once it gets the lock, and tries again.
        try:
            if _identity(os.lstat(self.lock_path)) == _identity(os.fstat(self._lock_fd)):
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock(path: Path, lock_path: Path) -> int:
    """Open and ``flock`` the lock file; its descriptor. SocketError if another daemon holds it."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SocketError(f"cannot open the lock file {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SocketError(
                f"another mlxkvd is already serving on {path}, or starting to (it holds "
                f"{lock_path}); stop it first, or choose another --socket path"
            ) from None
        try:
            same = _identity(os.lstat(lock_path)) == _identity(os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        # The holder removed the file as we opened it: lock the one that stands there now.
        os.close(fd)


def claim(path: Path) -> SocketClaim:
    """Claim ``path`` for this daemon: check the directory, take the lock, refuse a live daemon
    or a file that is not a socket, remove a stale socket (and a stale bind name).

    The caller binds ``bind_path``, calls ``publish()`` and, at shutdown, ``release()``.
    """
    check_length(path)
    prepare_directory(path.parent)
    lock_path = path.with_name(path.name + ".lock")
    claimed = SocketClaim(path, lock_path, _lock(path, lock_path))
    try:
        _remove_stale(path, live_message=f"another mlxkvd is already serving on {path}")
        # Left by a daemon that died while starting; nobody serves on it.
        _remove_stale(claimed.bind_path, live_message=f"something is serving on {claimed.bind_path}")
    except BaseException:
        claimed.release()
        raise
    return claimed


def _remove_stale(path: Path, *, live_message: str) -> None:
    """Remove a socket nobody accepts connections on; SocketError for a live one or a file that
    is not a socket. Only for the lock holder."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if is_live(path):
        raise SocketError(live_message)
    os.unlink(path)
