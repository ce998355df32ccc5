"""Start the daemon on demand (``mlxkv --start``), for machines where it is not a service.

The daemon is started detached (its own session, output to a log file), on the socket the
client would use, and keeps running after the client exits: the next client finds it warm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs

from mlxkv.paths import APP_NAME

DAEMON = "mlxkvd"


class DaemonNotInstalledError(Exception):
    """No ``mlxkvd`` next to this Python nor on PATH: only the client is installed."""


def daemon_command() -> list[str]:
    """``mlxkvd`` beside this Python (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).absolute().parent / DAEMON  # not resolved: a venv symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(DAEMON)
    if found:
        return [str(Path(found).absolute())]
    raise DaemonNotInstalledError(
        f"`{DAEMON}` is not installed here; install the daemon with "
        "`pip install 'mlxkv[server]'` (see README.md)"
    )


def log_path() -> Path:
    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)) / f"{DAEMON}.log"


def start_daemon(socket_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``mlxkvd serve`` on ``socket_path`` in the background; returns the process and
    its log file. The caller waits for it to answer (``Client.wait_ready``)."""
    command = [*daemon_command(), "serve", "--socket", str(socket_path)]
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed with the terminal or the client
            close_fds=True,
        )
    return proc, log
