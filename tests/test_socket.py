"""The daemon's Unix socket, with real daemons: private whatever the umask, closed to other
users, length-checked, a stale socket replaced, a live one defended; an existing directory
never chmod'ed, the path claimed atomically, and only the daemon's own socket ever unlinked.

Tests of ``claim`` itself (no daemon) come first; they make no model and run in a moment.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon, wait_for, wait_healthy

from mlxkv.paths import MAX_SOCKET_PATH
from mlxkvd.daemon import EXIT_SOCKET
from mlxkvd.socketfile import SocketError, claim, is_live


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def serve_once(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A daemon that is expected to refuse to start."""
    env = {**os.environ, "MLXKV_CONFIG": ""}
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", "serve", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def listen_on(path: Path) -> socket.socket:
    """A listening socket bound at ``path``: someone else's server, or a stand-in for ours."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


def spawn(path: Path, cache_dir: Path, log_path: Path) -> subprocess.Popen:
    """``mlxkvd serve`` on ``path``, not waited for (``Daemon.start`` waits until it serves)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(path), "--cache-dir", str(cache_dir),
             "--max-disk-bytes", "0"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLXKV_CONFIG": ""},
        )


@pytest.fixture
def base():
    """A fresh private directory to build test directories in."""
    path = Path(tempfile.mkdtemp(prefix="mlxkv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


# --- claim(): the directory ----------------------------------------------------------------


def test_a_missing_directory_and_its_parents_are_created_0700_whatever_the_umask(base):
    path = base / "a" / "b" / "x.sock"
    old = os.umask(0)
    try:
        claimed = claim(path)
    finally:
        os.umask(old)
    assert mode(base / "a") == mode(base / "a" / "b") == 0o700
    claimed.release()


def test_an_existing_private_directory_is_used_as_it_is(base):
    mine = base / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)  # not writable by others: safe, and not ours to tighten
    claim(mine / "x.sock").release()
    assert mode(mine) == 0o755


def test_a_shared_sticky_directory_like_tmp_is_refused_and_left_alone(base):
    shared = base / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(SocketError) as info:
        claim(shared / "x.sock")
    assert mode(shared) == 0o1777
    message = str(info.value)
    assert f"{shared} is a shared directory" in message and "private directory" in message
    assert list(shared.iterdir()) == []  # no socket, no lock file


def test_a_group_writable_directory_is_refused_and_left_alone(base):
    group = base / "group"
    group.mkdir()
    os.chmod(group, 0o770)
    with pytest.raises(SocketError, match="writable by group or others"):
        claim(group / "x.sock")
    assert mode(group) == 0o770
    assert list(group.iterdir()) == []


def test_a_symlinked_directory_is_judged_by_its_target_and_the_target_never_changed(base):
    target = base / "target"
    target.mkdir()
    link = base / "link"
    link.symlink_to(target)
    os.chmod(target, 0o1777)
    with pytest.raises(SocketError, match="shared directory"):
        claim(link / "x.sock")
    assert mode(target) == 0o1777
    os.chmod(target, 0o755)
    claim(link / "x.sock").release()
    assert mode(target) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_directory_of_another_user_is_refused_and_left_alone(base):
    theirs = base / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(SocketError, match="belongs to another user"):
        claim(theirs / "x.sock")
    st = os.stat(theirs)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o755)
    assert list(theirs.iterdir()) == []


def test_a_path_with_no_room_for_the_bind_name_is_refused_before_anything_is_made(base):
    # It fits sun_path, but the name gRPC binds first (".<name>.bind") would not.
    name = "s" * (MAX_SOCKET_PATH - 1 - len(f"{base}/new/"))
    path = base / "new" / name
    assert len(os.fsencode(str(path))) == MAX_SOCKET_PATH - 1
    with pytest.raises(SocketError, match="Choose a shorter --socket path"):
        claim(path)
    assert list(base.iterdir()) == []


# --- claim(): the lock and the daemon's own socket ------------------------------------------


def test_one_claim_at_a_time_and_the_lock_file_goes_with_the_claim(base):
    path = base / "x.sock"
    first = claim(path)
    assert mode(lock_file(path)) == 0o600
    with pytest.raises(SocketError, match=f"another mlxkvd is already serving on {path}"):
        claim(path)
    first.release()
    assert list(base.iterdir()) == []
    claim(path).release()


def test_a_stale_socket_is_replaced_by_the_claim_holder(base):
    path = base / "x.sock"
    listen_on(path).close()  # what a killed daemon leaves
    claimed = claim(path)
    assert not os.path.lexists(path)
    claimed.release()


def test_release_removes_the_socket_it_published_and_nothing_else(base):
    path = base / "x.sock"
    claimed = claim(path)
    ours = listen_on(claimed.bind_path)
    claimed.publish()
    assert is_live(path) and not os.path.lexists(claimed.bind_path)
    claimed.release()
    ours.close()
    assert list(base.iterdir()) == []

    claimed = claim(path)
    ours = listen_on(claimed.bind_path)
    claimed.publish()
    os.unlink(path)
    theirs = listen_on(path)  # someone else's socket now stands at the path
    inode = os.stat(path).st_ino
    claimed.release()
    assert os.stat(path).st_ino == inode and is_live(path)
    theirs.close()
    ours.close()


def test_publish_never_replaces_what_appeared_at_the_path(base):
    path = base / "x.sock"
    claimed = claim(path)
    ours = listen_on(claimed.bind_path)
    path.write_text("precious")
    with pytest.raises(SocketError, match="appeared while this daemon was starting"):
        claimed.publish()
    claimed.release()
    ours.close()
    assert path.read_text() == "precious"
    assert sorted(p.name for p in base.iterdir()) == ["x.sock"]


def test_a_claim_that_never_published_removes_no_socket(base):
    path = base / "x.sock"
    claimed = claim(path)
    theirs = listen_on(path)
    claimed.release()
    assert is_live(path)
    theirs.close()


# --- real daemons ---------------------------------------------------------------------------


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


def test_a_shared_directory_makes_the_daemon_exit_3_and_is_left_alone(base, cache_dir):
    shared = base / "tmp"  # a stand-in for /tmp: the test must not risk the real one
    shared.mkdir()
    os.chmod(shared, 0o1777)
    proc = serve_once("--socket", str(shared / "x.sock"), "--cache-dir", str(cache_dir))
    assert proc.returncode == EXIT_SOCKET
    assert f"{shared} is a shared directory" in proc.stderr and "private directory" in proc.stderr
    assert mode(shared) == 0o1777
    assert list(shared.iterdir()) == []


def test_two_daemons_started_at_once_on_one_path_one_serves_the_other_exits_3(base, cache_dir, model_dir, tmp_path):
    path = base / "race.sock"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [spawn(path, cache_dir, log) for log in logs]
    try:
        loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), timeout=180)
        winner = procs[1 - procs.index(loser)]
        assert loser.returncode == EXIT_SOCKET
        assert f"another mlxkvd is already serving on {path}" in logs[procs.index(loser)].read_text()
        wait_healthy(path, proc=winner)
        # The loser left the winner's socket and lock in place.
        assert is_live(path) and lock_file(path).exists()
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(60) == 0
        assert not os.path.lexists(path) and not lock_file(path).exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(60)


def test_a_daemon_does_not_unlink_a_socket_that_replaced_its_own(make_daemon):
    d = make_daemon("--max-disk-bytes", "0")
    os.unlink(d.socket)
    theirs = listen_on(d.socket)
    inode = os.stat(d.socket).st_ino
    try:
        assert d.stop() == 0
        assert os.stat(d.socket).st_ino == inode and is_live(d.socket)
        assert f"not removing {d.socket}" in d.log()
    finally:
        theirs.close()
        d.socket.unlink(missing_ok=True)
