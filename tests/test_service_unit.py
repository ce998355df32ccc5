"""The LaunchAgent plist and the systemd user unit, and `mlxkvd install` / `uninstall`.

The rendering is checked key by key on any platform; `systemd-analyze` checks the unit where it
exists. Installing runs the real command with HOME in a temporary directory: with --print, and
for real on a PATH without systemctl, which must still write the unit and then fail clearly.
"""

from __future__ import annotations

import io
import os
import plistlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mlxkvd import service_unit as su
from mlxkvd.daemon import EXIT_HTTP, EXIT_MODEL, EXIT_SERVICE, EXIT_SOCKET, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent
VENV_MLXKVD = str(Path(sys.executable).absolute().parent / "mlxkvd")


def spec(home: Path, argv=("/opt/mlxkv/bin/mlxkvd", "serve", "--log-level", "DEBUG"), grace=10.0):
    return su.ServiceSpec(
        argv=tuple(argv),
        socket=home / "run" / "mlxkvd.sock",
        home=home,
        shutdown_grace_s=grace,
        no_restart_exit_codes=(EXIT_USAGE, EXIT_MODEL),
    )


def unit_directives(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}`` of a unit file, comments skipped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def key_paths(value, prefix=()) -> set[tuple[str, ...]]:
    """Every key of a nested plist dict, as paths."""
    if not isinstance(value, dict):
        return set()
    out = set()
    for k, v in value.items():
        out.add((*prefix, k))
        out |= key_paths(v, (*prefix, k))
    return out


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    # Without XDG_RUNTIME_DIR and a session bus, `systemctl --user` reaches no manager, even on
    # a desktop: the caller's environment places the unit.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXKV_", "XDG_", "DBUS_"))}
    return {**env, "HOME": str(home), **extra}


def mlxkvd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", *args], env=env, capture_output=True, text=True, timeout=60
    )


# --- launchd ------------------------------------------------------------------------------


def test_plist_has_every_key(tmp_path):
    s = spec(tmp_path, grace=12.5)
    plist = plistlib.loads(su.render_plist(s))
    log = str(tmp_path / "Library" / "Logs" / "mlxkv" / "mlxkvd.log")
    assert plist == {
        "Label": "dev.mlxkv.mlxkvd",
        "ProgramArguments": ["/opt/mlxkv/bin/mlxkvd", "serve", "--log-level", "DEBUG"],
        "EnvironmentVariables": {
            "MLXKV_SOCKET": str(tmp_path / "run" / "mlxkvd.sock"),
            "PATH": "/opt/mlxkv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        },
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": su.THROTTLE_S,
        "ExitTimeOut": 13 + su.STOP_MARGIN_S,
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    # launchd must wait longer than the daemon's own grace before it sends SIGKILL.
    assert plist["ExitTimeOut"] > 12.5


def test_plist_reference_copy_matches_the_rendered_one():
    reference = plistlib.loads((REPO / "launchd" / "dev.mlxkv.mlxkvd.plist").read_bytes())
    rendered = su.launchd_plist(spec(Path("/Users/you"), argv=("/x/mlxkvd", "serve")))
    assert key_paths(reference) == key_paths(rendered)
    for key in ("Label", "RunAtLoad", "KeepAlive", "ThrottleInterval", "ExitTimeOut", "ProcessType"):
        assert reference[key] == rendered[key], key
    assert reference["ProgramArguments"][1:] == ["serve"]


# --- systemd ------------------------------------------------------------------------------


def test_unit_has_every_directive(tmp_path):
    s = spec(tmp_path, grace=10)
    assert unit_directives(su.systemd_unit(s)) == {
        "Unit": [("Description", "mlxkv inference daemon (MLX model, per-conversation KV caches)")],
        "Service": [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("TimeoutStartSec", str(su.START_TIMEOUT_S)),
            ("ExecStart", "/opt/mlxkv/bin/mlxkvd serve --log-level DEBUG"),
            ("Environment", f"MLXKV_SOCKET={tmp_path}/run/mlxkvd.sock"),
            ("Environment", "PATH=/opt/mlxkv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            ("Restart", "on-failure"),
            ("RestartSec", str(su.THROTTLE_S)),
            ("RestartPreventExitStatus", f"{EXIT_USAGE} {EXIT_MODEL}"),
            ("KillSignal", "SIGTERM"),
            ("TimeoutStopSec", str(10 + su.STOP_MARGIN_S)),
        ],
        "Install": [("WantedBy", "default.target")],
    }


def test_unit_quotes_spaces_and_escapes_specifiers(tmp_path):
    s = spec(tmp_path / "my home", argv=("/opt/my apps/mlxkvd", "serve", "--model", "/m/100%"))
    service = dict(unit_directives(su.systemd_unit(s))["Service"])
    assert service["ExecStart"] == '"/opt/my apps/mlxkvd" serve --model /m/100%%'


def test_unit_reference_copy_matches_the_rendered_one():
    reference = unit_directives((REPO / "launchd" / "mlxkvd.service").read_text())
    rendered = unit_directives(su.systemd_unit(spec(Path("/home/you"), argv=("/x/mlxkvd", "serve"))))
    assert {s: [k for k, _ in d] for s, d in reference.items()} == {
        s: [k for k, _ in d] for s, d in rendered.items()
    }
    path_dependent = {"ExecStart", "Environment"}
    for section in rendered:
        constant = [kv for kv in rendered[section] if kv[0] not in path_dependent]
        assert [kv for kv in reference[section] if kv[0] not in path_dependent] == constant


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}

    def verify(text: str) -> str:
        unit = tmp_path / "mlxkvd.service"
        unit.write_text(text)
        proc = subprocess.run(
            ["systemd-analyze", "--user", "verify", str(unit)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        # verify exits 0 on unknown keys and bad values too: its warnings name the file.
        return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if str(unit) in line)

    text = su.systemd_unit(spec(tmp_path, argv=(VENV_MLXKVD, "serve")))
    assert verify(text) == ""
    # The check can fail: a bad directive is reported.
    assert "Unknown key" in verify(text.replace("KillSignal=", "KillSignall="))


# --- install / uninstall ------------------------------------------------------------------


def test_install_plans_for_a_reinstall_restart_the_running_service(tmp_path):
    s = spec(tmp_path)
    fresh = su.install_plan(su.SYSTEMD, s, uid=501, environ={})
    assert [st.argv[2:] for st in fresh.steps if isinstance(st, su.Run)] == [
        ("daemon-reload",), ("enable", "--now", "mlxkvd.service"),
    ]
    fresh.file.parent.mkdir(parents=True)
    fresh.file.write_text("old")
    again = su.install_plan(su.SYSTEMD, s, uid=501, environ={})
    assert [st.argv[2:] for st in again.steps if isinstance(st, su.Run)] == [
        ("daemon-reload",), ("enable", "mlxkvd.service"), ("restart", "mlxkvd.service"),
    ]
    mac = su.install_plan(su.LAUNCHD, s, uid=501)
    assert [st.argv for st in mac.steps if isinstance(st, su.Run)] == [
        ("launchctl", "enable", "gui/501/dev.mlxkv.mlxkvd"),
        ("launchctl", "bootstrap", "gui/501", str(tmp_path / "Library/LaunchAgents/dev.mlxkv.mlxkvd.plist")),
    ]
    mac.file.parent.mkdir(parents=True)
    mac.file.write_text("old")
    first = su.install_plan(su.LAUNCHD, s, uid=501).steps[0]
    assert first == su.Run(("launchctl", "bootout", "gui/501/dev.mlxkv.mlxkvd"), must_succeed=False)


def test_parse_environment_reads_systemctl_show_environment():
    # As systemd 252 prints it: plain values as they are, others quoted $'...' with escapes.
    text = (
        "HOME=/root\n"
        "XDG_CONFIG_HOME=$'/home/me/my config'\n"
        "QUOTED=$'it\\'s\\ta\\nb\\\\c'\n"
        "EMPTY=\n"
        "EQUALS=a=b\n"
        "not a variable\n"
    )
    assert su.parse_environment(text) == {
        "HOME": "/root",
        "XDG_CONFIG_HOME": "/home/me/my config",
        "QUOTED": "it's\ta\nb\\c",
        "EMPTY": "",
        "EQUALS": "a=b",
    }


def test_plans_put_the_unit_where_the_user_manager_looks(tmp_path):
    s = spec(tmp_path)
    shell = {"XDG_CONFIG_HOME": str(tmp_path / "shell-config")}
    manager = su.parse_environment(f"HOME={tmp_path}\nXDG_CONFIG_HOME={tmp_path}/manager-config\n")
    unit = tmp_path / "manager-config" / "systemd" / "user" / "mlxkvd.service"
    assert su.install_plan(su.SYSTEMD, s, uid=501, environ=manager).file == unit
    assert su.install_plan(su.SYSTEMD, s, uid=501, environ=manager).steps[0] == su.Write(
        unit, su.systemd_unit(s).encode()
    )
    assert su.uninstall_plan(su.SYSTEMD, home=tmp_path, uid=501, environ=manager).steps[1] == su.Remove(unit)
    # A manager without XDG_CONFIG_HOME looks in ~/.config, whatever the shell exports.
    default = tmp_path / ".config" / "systemd" / "user" / "mlxkvd.service"
    assert su.install_plan(su.SYSTEMD, s, uid=501, environ={"HOME": str(tmp_path)}).file == default
    assert su.uninstall_plan(su.SYSTEMD, home=tmp_path, uid=501, environ={}).file == default
    # No manager to ask: the caller's environment, as before.
    assert su.install_plan(su.SYSTEMD, s, uid=501, environ=shell).file == (
        tmp_path / "shell-config" / "systemd" / "user" / "mlxkvd.service"
    )


def test_manager_environment_is_none_without_systemctl_or_manager(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert su.manager_environment() is None
    fake = tmp_path / "systemctl"
    fake.write_text('#!/bin/sh\n[ "$*" = "--user show-environment" ] || exit 9\necho "XDG_CONFIG_HOME=/c"\n')
    fake.chmod(0o755)
    assert su.manager_environment() == {"XDG_CONFIG_HOME": "/c"}
    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2; exit 1\n")
    assert su.manager_environment() is None
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    started = time.monotonic()
    assert su.manager_environment(timeout=0.5) is None
    assert time.monotonic() - started < 5


def test_a_missing_unit_says_the_directory_is_not_searched(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *enable*) echo "Failed to enable unit: Unit file mlxkvd.service '
        'does not exist." >&2; exit 1;; esac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    plan = su.install_plan(su.SYSTEMD, spec(tmp_path), uid=501, environ={"HOME": str(tmp_path)})
    out = io.StringIO()
    errors = su.perform(plan, out)
    assert "ran systemctl --user daemon-reload" in out.getvalue()
    assert "Unit file mlxkvd.service does not exist" in errors[0]
    assert f"{plan.file.parent} is not in the systemd user manager's unit search path" in errors[-1]
    assert "Is a systemd user session running" not in errors[-1]


def test_notify_sends_datagrams_and_never_raises(tmp_path):
    assert su.notify("READY=1", environ={}) is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        assert su.notify("READY=1\nSTATUS=serving", environ={"NOTIFY_SOCKET": str(path)})
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving"
    if sys.platform.startswith("linux"):
        # The abstract namespace: '@' stands for the leading NUL byte.
        name = f"mlxkv-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind("\0" + name)
            assert su.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
            assert listener.recv(4096) == b"STOPPING=1"
    # Nobody listening: reported, not raised.
    assert su.notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is False
    assert su.notify("READY=1", environ={"NOTIFY_SOCKET": "/" + "x" * 200}) is False


def test_install_print_shows_the_unit_and_commands_and_changes_nothing(tmp_path):
    proc = mlxkvd("install", "--print", "--manager", "systemd", env=isolated_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / ".config" / "systemd" / "user" / "mlxkvd.service"
    assert f"# write {unit}:" in proc.stdout
    assert f"ExecStart={VENV_MLXKVD} serve\n" in proc.stdout
    assert proc.stdout.rstrip().endswith(
        "systemctl --user daemon-reload\nsystemctl --user enable --now mlxkvd.service"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_install_and_uninstall_use_the_user_managers_config_home(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    manager_config = tmp_path / "manager config"
    (bin_dir / "systemctl").write_text(
        f"#!/bin/sh\n[ \"$*\" = '--user show-environment' ] && echo \"XDG_CONFIG_HOME=$'{manager_config}'\"\n"
    )
    (bin_dir / "systemctl").chmod(0o755)
    env = isolated_env(tmp_path, PATH=str(bin_dir), XDG_CONFIG_HOME=str(tmp_path / "shell"))
    unit = manager_config / "systemd" / "user" / "mlxkvd.service"
    proc = mlxkvd("install", "--print", "--manager", "systemd", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (
        f"mlxkvd: the service reads {manager_config}/mlxkv/mlxkvd.toml (the systemd user manager's "
        f"XDG_CONFIG_HOME), not {tmp_path}/shell/mlxkv/mlxkvd.toml"
    )
    assert f"# write {unit}:" in proc.stdout
    # A config file named explicitly is passed on: the service reads that one, no note.
    config = tmp_path / "mine.toml"
    config.write_text("")
    explicit = mlxkvd("install", "--print", "--manager", "systemd", "--config", str(config), env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert "the service reads" not in explicit.stdout
    assert f"serve --config {config}\n" in explicit.stdout
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    proc = mlxkvd("uninstall", "--print", "--manager", "systemd", env=env)
    assert f"rm -f '{unit}'" in proc.stdout.splitlines()


def test_install_print_for_launchd_renders_a_valid_plist(tmp_path):
    proc = mlxkvd("install", "--print", "--manager", "launchd", env=isolated_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    xml = proc.stdout[proc.stdout.index("<?xml"): proc.stdout.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert plist["ProgramArguments"] == [VENV_MLXKVD, "serve"]
    assert plist["StandardErrorPath"] == str(tmp_path / "Library/Logs/mlxkv/mlxkvd.log")
    target = f"gui/{os.getuid()}"
    assert f"launchctl bootstrap {target} {tmp_path}/Library/LaunchAgents/dev.mlxkv.mlxkvd.plist" in proc.stdout
    assert not (tmp_path / "Library").exists()


def test_install_writes_flags_and_env_into_the_command_line_not_file_settings(tmp_path):
    config = tmp_path / "conf" / "mlxkvd.toml"
    config.parent.mkdir()
    config.write_text('default_max_tokens = 64\nsocket = "s/d.sock"\n')
    env = isolated_env(tmp_path, MLXKV_LOG_LEVEL="debug")
    proc = mlxkvd("install", "--print", "--config", str(config), "--max-cache-bytes", "1GiB", env=env)
    assert proc.returncode == 0, proc.stderr
    exec_start = re.search(r"^ExecStart=(.*)$", proc.stdout, re.M).group(1)
    assert exec_start.split() == [
        VENV_MLXKVD, "serve", "--config", str(config),
        "--max-cache-bytes", str(1024**3), "--log-level", "DEBUG",
    ]
    # The socket named in the file, relative to the file, pinned in the service's environment.
    assert f"Environment=MLXKV_SOCKET={tmp_path}/conf/s/d.sock\n" in proc.stdout


def test_install_passes_the_http_gateway_on_and_pins_its_key_file(tmp_path):
    env = isolated_env(tmp_path, MLXKV_HTTP_ALLOW_ANY_ADDRESS="1")
    proc = mlxkvd("install", "--print", "--manager", "systemd", "--http", "0.0.0.0:8080", env=env)
    assert proc.returncode == 0, proc.stderr
    exec_start = re.search(r"^ExecStart=(.*)$", proc.stdout, re.M).group(1)
    key_file = str(tmp_path / ".config" / "mlxkv" / "api-key")
    assert exec_start.split() == [VENV_MLXKVD, "serve", "--http", "0.0.0.0:8080", "--http-allow-any-address",
                                  "--http-api-key-file", key_file]
    restart = re.search(r"^RestartPreventExitStatus=(.*)$", proc.stdout, re.M).group(1)
    assert str(EXIT_HTTP) in restart.split()
    # A service that would refuse to start is not installed.
    refused = mlxkvd("install", "--print", "--manager", "systemd", "--http", "0.0.0.0:8080",
                     env=isolated_env(tmp_path))
    assert refused.returncode == EXIT_HTTP and "--http-allow-any-address" in refused.stderr


def test_install_refuses_a_socket_path_over_the_limit(tmp_path):
    long_socket = "/tmp/" + "x" * 120 + ".sock"
    proc = mlxkvd("install", "--print", "--socket", long_socket, env=isolated_env(tmp_path))
    assert proc.returncode == EXIT_SOCKET
    assert "Choose a shorter --socket path" in proc.stderr


@pytest.fixture
def short_home():
    """A home directory with a short path: the default socket's path lives under it, and a
    deep temporary directory (pytest-xdist's) would make that path too long to bind."""
    home = Path(tempfile.mkdtemp(prefix="mlxkv-home-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_install_and_uninstall_without_systemctl_write_the_unit_and_fail_clearly(tmp_path, short_home):
    home = short_home
    bare = tmp_path / "bin"  # a PATH with no systemctl on it
    bare.mkdir()
    env = isolated_env(home, PATH=str(bare))
    unit = home / ".config" / "systemd" / "user" / "mlxkvd.service"

    proc = mlxkvd("install", "--manager", "systemd", env=env)
    assert proc.returncode == EXIT_SERVICE
    assert f"wrote {unit}" in proc.stdout
    assert "`systemctl --user daemon-reload` failed: systemctl not found on PATH" in proc.stderr
    assert f"{unit} was written, but the service is not running" in proc.stderr
    printed = mlxkvd("install", "--manager", "systemd", "--print", env=env).stdout
    assert unit.read_text().strip() in printed

    proc = mlxkvd("uninstall", "--manager", "systemd", env=env)
    assert proc.returncode == EXIT_SERVICE
    assert "`systemctl --user disable --now mlxkvd.service` failed: systemctl not found" in proc.stderr
    assert f"{unit} was removed" in proc.stderr
    assert not unit.exists()

    proc = mlxkvd("uninstall", "--manager", "systemd", env=env)
    assert proc.returncode == 0
    assert "not installed" in proc.stdout


def test_uninstall_print_lists_the_commands_and_removes_nothing(tmp_path):
    unit = tmp_path / ".config" / "systemd" / "user" / "mlxkvd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    proc = mlxkvd("uninstall", "--print", "--manager", "systemd", env=isolated_env(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "systemctl --user disable --now mlxkvd.service",
        f"rm -f {unit}",
        "systemctl --user daemon-reload",
    ]
    assert unit.exists()
    proc = mlxkvd("uninstall", "--print", "--manager", "launchd", env=isolated_env(tmp_path))
    assert proc.stdout.splitlines()[0] == f"launchctl bootout gui/{os.getuid()}/dev.mlxkv.mlxkvd  # may fail: not loaded"
