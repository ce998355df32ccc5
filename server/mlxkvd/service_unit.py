"""Run the daemon as a managed background service: a launchd LaunchAgent on macOS, a systemd
user unit on Linux.

Rendering is pure (a ``ServiceSpec`` in, a plist dict or unit text out) so that both can be
checked on any platform. Installing is a ``Plan``: the files to write or remove and the
``launchctl`` / ``systemctl`` commands to run, in order; ``describe`` prints it (``--print``),
``perform`` carries it out.

systemd reads user units from its own ``$XDG_CONFIG_HOME``, which need not be the installing
shell's: ``manager_environment`` asks the manager, and the plans take that environment.
``notify`` is the daemon's side of ``Type=notify``: it tells systemd when it serves.
"""

from __future__ import annotations

import logging
import os
import plistlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mlxkv.autostart import DaemonNotInstalledError, daemon_command
from mlxkv.paths import SOCKET_ENV

log = logging.getLogger(__name__)

LABEL = "dev.mlxkv.mlxkvd"
UNIT_NAME = "mlxkvd.service"
LAUNCHD = "launchd"
SYSTEMD = "systemd"
MANAGERS = (LAUNCHD, SYSTEMD)

# After a crash, wait this long before the next start: a daemon that dies at startup (a bad
# model path) must not spin, loading weights in a loop.
THROTTLE_S = 10
# The service manager's stop timeout (then SIGKILL) = the daemon's shutdown grace for running
# turns + this margin for closing the server and flushing caches to disk.
STOP_MARGIN_S = 20
# systemd's start timeout: the daemon is ready once the model is loaded (minutes for a large
# model on a slow disk; a first start also converts the default one). A hung start must end.
START_TIMEOUT_S = 600
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def default_manager() -> str:
    return LAUNCHD if sys.platform == "darwin" else SYSTEMD


def daemon_executable() -> list[str]:
    """The absolute command that runs ``mlxkvd``: the script next to this Python (the venv's),
    else the one on PATH, else ``python -m mlxkvd``."""
    try:
        return daemon_command()
    except DaemonNotInstalledError:  # running from a source tree: no script installed
        return [str(Path(sys.executable).absolute()), "-m", "mlxkvd"]


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs and where its files go; plain values only."""

    argv: tuple[str, ...]  # absolute executable, "serve", flags
    socket: Path
    home: Path
    shutdown_grace_s: float
    no_restart_exit_codes: tuple[int, ...] = ()  # failures a restart cannot fix

    @property
    def stop_timeout_s(self) -> int:
        return int(self.shutdown_grace_s + 0.999) + STOP_MARGIN_S

    @property
    def path_env(self) -> str:
        return f"{Path(self.argv[0]).parent}:{SYSTEM_PATH}"


# --- launchd ------------------------------------------------------------------------------


def launch_agents_dir(home: Path) -> Path:
    return home / "Library" / "LaunchAgents"


def plist_path(home: Path) -> Path:
    return launch_agents_dir(home) / f"{LABEL}.plist"


def launchd_log_path(home: Path) -> Path:
    return home / "Library" / "Logs" / "mlxkv" / "mlxkvd.log"


def launchd_plist(spec: ServiceSpec) -> dict:
    """The LaunchAgent as a dict, for ``plistlib``."""
    log = str(launchd_log_path(spec.home))
    return {
        "Label": LABEL,
        "ProgramArguments": list(spec.argv),
        "EnvironmentVariables": {SOCKET_ENV: str(spec.socket), "PATH": spec.path_env},
        "RunAtLoad": True,
        # Restart after a crash, not after a clean exit (SIGTERM, `launchctl bootout`).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_S,
        "ExitTimeOut": spec.stop_timeout_s,
        # Not Background: launchd would throttle its CPU and I/O, and a user waits on every turn.
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }


def render_plist(spec: ServiceSpec) -> bytes:
    return plistlib.dumps(launchd_plist(spec), fmt=plistlib.FMT_XML, sort_keys=False)


# --- systemd ------------------------------------------------------------------------------


def config_home(home: Path, environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME``, else ``~/.config``."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("XDG_CONFIG_HOME") or home / ".config")


def systemd_user_dir(home: Path, environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/systemd/user``): systemd's own rule, applied
    to the user manager's environment (``manager_environment``), not necessarily this shell's."""
    return config_home(home, environ) / "systemd" / "user"


def unit_path(home: Path, environ: dict[str, str] | None = None) -> Path:
    return systemd_user_dir(home, environ) / UNIT_NAME


def _systemd_escape(text: str) -> str:
    # In unit files, % starts a specifier and $ an environment variable substitution.
    return text.replace("%", "%%").replace("$", "$$")


def _systemd_word(arg: str) -> str:
    arg = _systemd_escape(arg)
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: ServiceSpec) -> str:
    """The systemd user unit's text."""
    env = {SOCKET_ENV: str(spec.socket), "PATH": spec.path_env}
    lines = [
        "[Unit]",
        "Description=mlxkv inference daemon (MLX model, per-conversation KV caches)",
        "",
        "[Service]",
        # Started means serving: the daemon sends READY=1 once its socket listens (``notify``),
        # so `systemctl --user enable --now` and `restart` return when clients can connect.
        "Type=notify",
        "NotifyAccess=main",
        f"TimeoutStartSec={START_TIMEOUT_S}",
        "ExecStart=" + " ".join(_systemd_word(a) for a in spec.argv),
        *(f"Environment={_systemd_word(f'{k}={v}')}" for k, v in env.items()),
        # `systemctl --user reload mlxkvd` re-reads the config file.
        "ExecReload=/bin/kill -HUP $MAINPID",
        # Restart after a crash, not after a clean exit (SIGTERM, `systemctl --user stop`).
        "Restart=on-failure",
        f"RestartSec={THROTTLE_S}",
    ]
    if spec.no_restart_exit_codes:
        lines.append("RestartPreventExitStatus=" + " ".join(map(str, spec.no_restart_exit_codes)))
    lines += [
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={spec.stop_timeout_s}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


_ESCAPED = re.compile(r"\\(.)", re.S)
_UNESCAPE = {"n": "\n", "t": "\t"}


def _shell_unquote(value: str) -> str:
    # systemctl quotes a value that needs it as $'...' (or "..."), with backslash escapes.
    if len(value) >= 3 and value.startswith("$'") and value.endswith("'"):
        value = value[2:-1]
    elif len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    else:
        return value
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), value)


def parse_environment(text: str) -> dict[str, str]:
    """The output of ``systemctl --user show-environment`` (``NAME=value`` lines) as a dict."""
    environ = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name:
            environ[name] = _shell_unquote(value)
    return environ


def manager_environment(timeout: float = 5.0) -> dict[str, str] | None:
    """The systemd user manager's environment, which decides where it looks for user units;
    None when it cannot be asked (no ``systemctl``, no user manager, no answer in time)."""
    if shutil.which("systemctl") is None:
        return None
    try:
        proc = subprocess.run(
            ("systemctl", "--user", "show-environment"), capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("systemctl --user show-environment: %s", exc)
        return None
    if proc.returncode != 0:
        log.debug("systemctl --user show-environment: %s", proc.stderr.strip())
        return None
    return parse_environment(proc.stdout)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send sd_notify state lines (``READY=1``, ``STATUS=...``) to ``$NOTIFY_SOCKET``.

    A no-op without that variable (not run by systemd with ``Type=notify``); never raises, since
    the daemon serves either way. Returns whether the message was sent.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except (OSError, ValueError) as exc:
        log.debug("sd_notify to %s failed: %s", environ["NOTIFY_SOCKET"], exc)
        return False
    return True


# --- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    path: Path
    content: bytes


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class Remove:
    path: Path


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    # False: a failure is expected in normal use (stopping a service that is not loaded).
    must_succeed: bool = True


Step = Write | MakeDir | Remove | Run


@dataclass(frozen=True)
class Plan:
    manager: str
    file: Path
    steps: tuple[Step, ...]
    keep_going: bool = False  # uninstall: clean up as much as possible despite failures


def install_plan(manager: str, spec: ServiceSpec, *, uid: int, environ: dict[str, str] | None = None) -> Plan:
    """Write the plist or unit and have the service manager start it now and at every login."""
    if manager == LAUNCHD:
        path = plist_path(spec.home)
        target = f"gui/{uid}/{LABEL}"
        reinstall = path.exists()
        return Plan(manager, path, (
            # A loaded agent keeps its old definition: unload it first (fails if not loaded).
            *([Run(("launchctl", "bootout", target), must_succeed=False)] if reinstall else []),
            MakeDir(launchd_log_path(spec.home).parent),
            Write(path, render_plist(spec)),
            Run(("launchctl", "enable", target)),
            Run(("launchctl", "bootstrap", f"gui/{uid}", str(path))),  # RunAtLoad starts it
        ))
    path = unit_path(spec.home, environ)
    reinstall = path.exists()
    systemctl = ("systemctl", "--user")
    return Plan(manager, path, (
        Write(path, systemd_unit(spec).encode()),
        Run((*systemctl, "daemon-reload")),
        *(
            # A running daemon keeps its old command line until it is restarted.
            [Run((*systemctl, "enable", UNIT_NAME)), Run((*systemctl, "restart", UNIT_NAME))]
            if reinstall
            else [Run((*systemctl, "enable", "--now", UNIT_NAME))]
        ),
    ))


def uninstall_plan(manager: str, *, home: Path, uid: int, environ: dict[str, str] | None = None) -> Plan:
    """Stop the service, remove its file, and tell the service manager."""
    if manager == LAUNCHD:
        path = plist_path(home)
        return Plan(manager, path, (
            Run(("launchctl", "bootout", f"gui/{uid}/{LABEL}"), must_succeed=False),
            Remove(path),
        ), keep_going=True)
    path = unit_path(home, environ)
    return Plan(manager, path, (
        Run(("systemctl", "--user", "disable", "--now", UNIT_NAME)),
        Remove(path),
        Run(("systemctl", "--user", "daemon-reload")),
    ), keep_going=True)


def describe(plan: Plan) -> str:
    """What ``perform`` would do, for ``--print``: file contents and commands, in order."""
    out = []
    for step in plan.steps:
        if isinstance(step, Write):
            out += [f"# write {step.path}:", step.content.decode().rstrip("\n")]
        elif isinstance(step, MakeDir):
            out.append(f"mkdir -p {shlex.quote(str(step.path))}")
        elif isinstance(step, Remove):
            out.append(f"rm -f {shlex.quote(str(step.path))}")
        else:
            suffix = "  # may fail: not loaded" if not step.must_succeed else ""
            out.append(shlex.join(step.argv) + suffix)
    return "\n".join(out) + "\n"


class ServiceManagerError(RuntimeError):
    """launchctl or systemctl is missing or failed; the message says what was done and what not."""


def _hint(plan: Plan, errors: list[str]) -> str:
    if plan.manager == LAUNCHD:
        return "Run the daemon in a terminal with `mlxkvd serve` instead."
    if any(f"{UNIT_NAME} does not exist" in e for e in errors):
        return (
            f"{plan.file.parent} is not in the systemd user manager's unit search path: it looks "
            "under its own XDG_CONFIG_HOME (`systemctl --user show-environment`; "
            "`systemctl --user set-environment XDG_CONFIG_HOME=...` changes it)."
        )
    return (
        "Is a systemd user session running (`systemctl --user status`; over ssh or in a "
        "container there may be none, see `loginctl enable-linger`)? "
        "Run the daemon in a terminal with `mlxkvd serve` instead."
    )


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _run(step: Run) -> str | None:
    """None on success, else why it failed."""
    if shutil.which(step.argv[0]) is None:
        return f"{step.argv[0]} not found on PATH"
    proc = subprocess.run(step.argv, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    detail = (proc.stderr or proc.stdout).strip()
    return f"exit code {proc.returncode}" + (f": {detail}" if detail else "")


def perform(plan: Plan, out: TextIO) -> list[str]:
    """Carry out the plan, reporting each step on ``out``. Returns the errors (empty: success).

    An install stops at the first failed command; an uninstall goes on to remove the file.
    """
    errors: list[str] = []
    for step in plan.steps:
        if isinstance(step, Write):
            _write(step.path, step.content)
            print(f"wrote {step.path}", file=out)
        elif isinstance(step, MakeDir):
            step.path.mkdir(parents=True, exist_ok=True)
        elif isinstance(step, Remove):
            if step.path.exists():
                step.path.unlink()
                print(f"removed {step.path}", file=out)
        else:
            command = shlex.join(step.argv)
            failure = _run(step)
            if failure is None:
                print(f"ran {command}", file=out)
                continue
            if not step.must_succeed and "not found on PATH" not in failure:
                print(f"ran {command} (ignored: {failure})", file=out)
                continue
            errors.append(f"`{command}` failed: {failure}")
            if not plan.keep_going:
                break
    if errors and any(isinstance(s, Write) for s in plan.steps):
        errors.append(f"{plan.file} was written, but the service is not running. {_hint(plan, errors)}")
    elif errors:
        state = "is still there" if plan.file.exists() else "was removed"
        errors.append(f"{plan.file} {state}; the service manager may still know the service.")
    return errors
