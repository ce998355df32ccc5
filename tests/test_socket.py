"""The daemon's Unix socket, with real daemons: private whatever the umask, closed to other
users, length-checked, a stale socket replaced, a live one defended."""

from __future__ import annotations

import errno
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon, wait_healthy

from mlxkv.paths import MAX_SOCKET_PATH
from mlxkvd.daemon import EXIT_SOCKET
from mlxkvd.socketfile import is_live


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def serve_once(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A daemon that is expected to refuse to start."""
    env = {**os.environ, "MLXKV_CONFIG": ""}
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", "serve", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def connect_as(user: str, path: Path) -> int:
    """Try to connect to ``path`` as ``user`` in a forked child; 0 or the errno."""
    pw = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, connect, report through the exit code
        code = 255
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(path))
                code = 0
            except OSError as exc:
                code = exc.errno or 254
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="module")
def private_daemon(cache_dir, model_dir, tmp_path_factory):
    """A daemon started with umask 000 on a socket whose directories do not exist yet."""
    base = Path(tempfile.mkdtemp(prefix="mlxkv-"))
    os.chmod(base, 0o711)  # traversable by others, so that only our modes keep them out
    d = Daemon(
        socket=base / "a" / "b" / "d.sock",
        cache_dir=cache_dir,
        log_path=tmp_path_factory.mktemp("log") / "daemon.log",
        extra_args=["--max-disk-bytes", "0"],
    )
    old = os.umask(0)
    try:
        d.start()
    finally:
        os.umask(old)
    yield d
    d.stop()


def test_directories_are_0700_and_the_socket_0600_whatever_the_umask(private_daemon):
    sock = private_daemon.socket
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert mode(sock) == 0o600
    assert mode(sock.parent) == 0o700
    assert mode(sock.parent.parent) == 0o700  # a parent it created too


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_connect(private_daemon):
    sock = private_daemon.socket
    dirs = (sock.parent.parent, sock.parent)
    assert connect_as("nobody", sock) == errno.EACCES
    try:
        # The directories alone keep others out; so does the socket's own mode alone.
        for d in dirs:
            os.chmod(d, 0o711)
        assert connect_as("nobody", sock) == errno.EACCES
        # The control: with the socket open to all, the same attempt connects.
        os.chmod(sock, 0o666)
        assert connect_as("nobody", sock) == 0
    finally:
        os.chmod(sock, 0o600)
        for d in dirs:
            os.chmod(d, 0o700)
    assert is_live(sock)


def test_a_second_daemon_on_a_live_socket_refuses_to_start(private_daemon, cache_dir):
    proc = serve_once("--socket", str(private_daemon.socket), "--cache-dir", str(cache_dir))
    assert proc.returncode == EXIT_SOCKET
    assert f"another mlxkvd is already serving on {private_daemon.socket}" in proc.stderr
    # The first one still serves, on its socket.
    wait_healthy(private_daemon.socket, timeout=5, proc=private_daemon.proc)


def test_a_path_over_the_platform_limit_is_refused(tmp_path, cache_dir):
    # One byte over: sun_path must also hold the terminating NUL.
    long_path = Path("/tmp/" + "s" * (MAX_SOCKET_PATH - len("/tmp/") - len(".sock")) + ".sock")
    assert len(os.fsencode(str(long_path))) == MAX_SOCKET_PATH
    proc = serve_once("--socket", str(long_path), "--cache-dir", str(cache_dir))
    assert proc.returncode == EXIT_SOCKET
    assert f"this platform allows at most {MAX_SOCKET_PATH - 1}" in proc.stderr
    assert "Choose a shorter --socket path" in proc.stderr
    assert not long_path.exists()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path, cache_dir):
    path = tempfile.mkdtemp(prefix="mlxkv-") + "/notasock"
    Path(path).write_text("precious")
    proc = serve_once("--socket", path, "--cache-dir", str(cache_dir))
    assert proc.returncode == EXIT_SOCKET
    assert "exists and is not a socket; refusing to replace it" in proc.stderr
    assert Path(path).read_text() == "precious"


def test_the_stale_socket_of_a_killed_daemon_is_replaced(make_daemon):
    d = make_daemon("--max-disk-bytes", "0")
    assert d.kill() == -signal.SIGKILL
    assert stat.S_ISSOCK(os.stat(d.socket).st_mode)  # left behind
    assert not is_live(d.socket)
    d.start()  # same path: the stale socket is replaced and the new daemon serves
    assert is_live(d.socket)
    assert d.stop() == 0
    assert not d.socket.exists()
