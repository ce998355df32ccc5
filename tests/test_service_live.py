"""`mlxkvd install` / `uninstall` against a real systemd user manager, end to end.

The test starts its own ``systemd --user`` as root in a private world: HOME, XDG_CONFIG_HOME
and XDG_RUNTIME_DIR in temporary directories, and a cgroup of its own, nested under the test
process's cgroup so that whatever limits apply to the test apply to the manager and the daemon.
Then it installs the service with the real ``mlxkvd install``, talks to the daemon systemd
started, kills it, reloads it, stops it and uninstalls it. A second, shorter test starts the
manager without the XDG_CONFIG_HOME the installing shell has, and checks that the unit lands
where the manager looks.

It skips where that is not possible: not Linux, not root, no systemd binaries, a host booted
with systemd (whose own cgroup tree this must not meddle with), cgroups that cannot be
written, a manager that does not come up.

Recipe pieces systemd needs here: ``/run/systemd/system`` must exist (else ``systemd --user``
says the system was not booted with systemd), and the manager must start in a cgroup it may
write to, in every hierarchy systemd uses (cgroup2, plus ``name=systemd`` on a hybrid layout).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxkv.client import Client, MlxkvError
from mlxkvd import blas
from mlxkvd.service_unit import STOP_MARGIN_S, THROTTLE_S, parse_environment

pytestmark = [pytest.mark.model]

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
BOOTED_MARKER = Path("/run/systemd/system")  # sd_booted(): "the system runs systemd"
UNIT = "mlxkvd.service"
VENV_MLXKVD = Path(sys.executable).absolute().parent / "mlxkvd"
# The launcher moves itself into the test's cgroups, then becomes the manager.
LAUNCHER = f'for f in "$@"; do echo $$ > "$f" || exit 97; done; exec {SYSTEMD} --user'
MANAGER_UP_S = 20.0
MODEL_LOAD_S = 180.0  # a first start converts the default model; later starts reuse it


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


# --- cgroups ------------------------------------------------------------------------------


def own_cgroups() -> list[Path]:
    """The cgroup directories of this process in the hierarchies systemd uses: cgroup2
    (at /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid layout) and name=systemd."""
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
        elif controllers == "name=systemd":
            mount = CGROUP_ROOT / "systemd"
        else:
            continue
        if (mount / "cgroup.procs").exists():
            dirs.append(mount / path.lstrip("/"))
    return dirs


def controller_cgroups(proc_cgroup: str) -> set[str]:
    """The cgroup v1 controller lines of a ``/proc/PID/cgroup`` (memory, cpu, ...)."""
    return {line for line in proc_cgroup.splitlines() if line.split(":")[1] not in ("", "name=systemd")}


def cgroup_tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, leaves first."""
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]


def cgroup_pids(top: Path) -> list[int]:
    pids = []
    for d in cgroup_tree(top):
        try:
            pids += [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            pass
    return pids


def remove_cgroups(tops: list[Path]) -> list[str]:
    """Kill every process left in the trees, then remove them leaf first; returns problems."""
    problems = []
    for top in tops:
        if (top / "cgroup.kill").exists():
            (top / "cgroup.kill").write_text("1")
    if not wait_for(lambda: not any(cgroup_pids(t) for t in tops), timeout=1.0, interval=0.05):
        for pid in {p for t in tops for p in cgroup_pids(t)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not wait_for(lambda: not any(cgroup_pids(t) for t in tops), timeout=10.0, interval=0.1):
            problems.append(f"processes still in the test cgroups: {[cgroup_pids(t) for t in tops]}")
    for top in tops:
        for d in cgroup_tree(top):
            try:
                d.rmdir()
            except OSError as exc:
                problems.append(f"rmdir {d}: {exc}")
    return problems


# --- the user manager ---------------------------------------------------------------------


@dataclass
class UserManager:
    """A private ``systemd --user`` and the environment its user's shell would have."""

    env: dict[str, str]
    home: Path
    config_home: Path  # the manager's: where it looks for units
    runtime_dir: Path
    daemon_log: Path
    proc: subprocess.Popen | None = None

    @property
    def unit_dir(self) -> Path:
        return self.config_home / "systemd" / "user"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "mlxkv" / "mlxkvd.sock"

    def systemctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["systemctl", "--user", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def show(self, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", UNIT).stdout.strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID") or 0)

    def mlxkvd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_MLXKVD), *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def diagnostics(self) -> str:
        status = self.systemctl("status", "--no-pager", UNIT).stdout
        return f"\n--- systemctl --user status {UNIT}:\n{status}\n--- daemon log:\n{tail(self.daemon_log)}"


def skip_unless_possible() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("systemd user units are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("starting a private systemd user manager needs root (cgroups, /run/systemd)")
    if not (SYSTEMD.is_file() and os.access(SYSTEMD, os.X_OK)) or shutil.which("systemctl") is None:
        pytest.skip(f"no {SYSTEMD} or no systemctl")
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.skip("the host runs systemd: this test would meddle with its cgroup tree")
    if not VENV_MLXKVD.is_file():
        pytest.skip(f"no mlxkvd script next to {sys.executable}")


@pytest.fixture
def user_manager(request, tmp_path):
    """A running private ``systemd --user``; stopped, killed and cleaned up afterwards.

    The shell's environment (``env``) has XDG_CONFIG_HOME; so does the manager's, unless the
    fixture is parametrized with False (a user who exports it only in a shell rc file).
    """
    manager_has_config_home = getattr(request, "param", True)
    skip_unless_possible()
    cgroups = [d / f"mlxkv-test-{os.getpid()}.slice" for d in own_cgroups()]
    if not cgroups:
        pytest.skip("no cgroup2 or name=systemd hierarchy under /sys/fs/cgroup")
    made_marker = started = False
    # Short: the daemon's socket goes in here, and sun_path holds 108 bytes.
    runtime_dir = Path(tempfile.mkdtemp(prefix="mlxkv-rt-"))
    os.chmod(runtime_dir, 0o700)
    home = tmp_path / "home"
    # Not ~/.config: the unit must land where $XDG_CONFIG_HOME says.
    shell_config_home = tmp_path / "xdg-config"
    home.mkdir()
    shell_config_home.mkdir()
    # What a login shell has, and no more: a service sees only the manager's environment.
    env = {
        "HOME": str(home),
        "USER": "root",
        "LOGNAME": "root",
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "XDG_CONFIG_HOME": str(shell_config_home),
    }
    manager_env = env if manager_has_config_home else {k: v for k, v in env.items() if k != "XDG_CONFIG_HOME"}
    config_home = shell_config_home if manager_has_config_home else home / ".config"
    manager = UserManager(env, home, config_home, runtime_dir, tmp_path / "daemon.log")
    try:
        try:
            for top in cgroups:
                (top / "manager.service").mkdir(parents=True)
        except OSError as exc:
            pytest.skip(f"cannot create a cgroup for the manager: {exc}")
        if not BOOTED_MARKER.exists():
            try:
                BOOTED_MARKER.mkdir(parents=True)
            except OSError as exc:
                pytest.skip(f"cannot create {BOOTED_MARKER}: {exc}")
            made_marker = True
        # A user manager logs to /dev/console, whatever its stderr: nothing to capture here.
        procs_files = [str(top / "manager.service" / "cgroup.procs") for top in cgroups]
        manager.proc = subprocess.Popen(
            ["/bin/sh", "-c", LAUNCHER, "launcher", *procs_files],
            env=manager_env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        state = ""

        def running() -> bool:
            nonlocal state
            if manager.proc.poll() is not None:
                return True
            try:
                state = manager.systemctl("is-system-running", timeout=5).stdout.strip()
            except subprocess.TimeoutExpired:
                state = ""
            return state == "running"

        wait_for(running, timeout=MANAGER_UP_S)
        if manager.proc.poll() is not None:
            pytest.skip(f"systemd --user exited with {manager.proc.returncode} (it says why on /dev/console)")
        if state != "running":
            pytest.skip(f"systemd --user is {state or 'not answering'} after {MANAGER_UP_S:g} s")
        started = True
        yield manager
    finally:
        problems = []
        if manager.proc is not None and manager.proc.poll() is None and not started:
            manager.proc.kill()
            manager.proc.wait(timeout=10)
        elif manager.proc is not None and manager.proc.poll() is None:
            try:
                # Stops every unit (the daemon gets SIGTERM), then the manager exits.
                manager.systemctl("exit", timeout=10)
                manager.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("systemd --user did not exit within 30 s; killed")
                manager.proc.kill()
                manager.proc.wait(timeout=10)
        problems += remove_cgroups([t for t in cgroups if t.exists()])
        if made_marker:
            try:
                BOOTED_MARKER.rmdir()
            except OSError as exc:
                problems.append(f"rmdir {BOOTED_MARKER}: {exc}")
        shutil.rmtree(runtime_dir, ignore_errors=True)
        assert not problems, "teardown: " + "; ".join(problems)


# --- the tests ----------------------------------------------------------------------------


def check_answers(manager: UserManager, generate: bool = False) -> None:
    """The daemon answers on the socket the unit pins; optionally one short greedy turn."""
    with Client(manager.socket, timeout=60) as client:
        try:
            status = client.wait_ready(timeout=MODEL_LOAD_S)
        except MlxkvError as exc:
            pytest.fail(f"the daemon did not answer on {manager.socket}: {exc}{manager.diagnostics()}")
        assert status.model_loaded
        assert status.socket == str(manager.socket)
        if generate:
            turn = client.ask("Name one colour.", max_tokens=4)
            assert 1 <= turn.completion_tokens <= 4, turn
            assert turn.text.strip(), turn


def log_to_file(manager: UserManager) -> None:
    """No journald in this VM: a drop-in sends the daemon's output to a file, to check what it
    logs. Only the output changes; the unit itself is the one `mlxkvd install` writes."""
    drop_in = manager.unit_dir / f"{UNIT}.d" / "log.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(f"[Service]\nStandardOutput=append:{manager.daemon_log}\nStandardError=inherit\n")


def check_serves_at_once(manager: UserManager) -> None:
    """Type=notify: `enable --now` returned once the daemon sent READY=1, after its gRPC server
    started, so it answers without a wait for the model."""
    assert manager.socket.exists(), manager.diagnostics()
    with Client(manager.socket, timeout=10) as client:
        try:
            status = client.wait_ready(timeout=1.0)
        except MlxkvError as exc:
            pytest.fail(f"not serving when `mlxkvd install` returned: {exc}{manager.diagnostics()}")
    assert status.model_loaded
    assert manager.show("ActiveState") == "active"
    assert manager.show("StatusText") == f"serving {status.model} on {manager.socket}"


def test_install_run_crash_reload_stop_uninstall(user_manager):
    m = user_manager
    unit_file = m.unit_dir / UNIT
    log_to_file(m)

    # 1. install: the unit under $XDG_CONFIG_HOME, enabled, started and serving on return.
    installed = m.mlxkvd("install", "--shutdown-grace-s", "3")
    assert installed.returncode == 0, installed.stdout + installed.stderr + m.diagnostics()
    check_serves_at_once(m)
    assert f"the daemon listens on {m.socket}\n" in installed.stdout
    assert "the service reads" not in installed.stdout  # the shell's config directory is the manager's
    assert unit_file.is_file()
    assert not (m.home / ".config" / "systemd").exists()
    text = unit_file.read_text()
    assert f"ExecStart={VENV_MLXKVD} serve --shutdown-grace-s 3" in text
    assert f"Environment=MLXKV_SOCKET={m.socket}\n" in text
    # As systemd itself read the unit.
    assert m.show("Type") == "notify"
    assert m.show("NotifyAccess") == "main"
    assert m.show("Restart") == "on-failure"
    assert m.show("RestartUSec") == f"{THROTTLE_S}s"
    assert m.show("TimeoutStopUSec") == f"{3 + STOP_MARGIN_S}s"
    assert m.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert (m.unit_dir / "default.target.wants" / UNIT).is_symlink()

    # 2. The daemon systemd runs answers, and generates with the model from the wheel.
    check_answers(m, generate=True)
    first_pid = m.main_pid()
    assert first_pid > 0
    if blas.openblas_path() is not None:
        # READY=1 came from the re-executed process (same PID), which NotifyAccess=main accepts.
        assert b"MLXKV_BLAS_PRELOADED=1\0" in Path(f"/proc/{first_pid}/environ").read_bytes()
    daemon_cgroup = Path(f"/proc/{first_pid}/cgroup").read_text()
    assert f"/app.slice/{UNIT}\n" in daemon_cgroup, daemon_cgroup
    # The manager moves processes in its own hierarchies only: v1 controllers (a memory limit,
    # say) hold the daemon where they hold this test.
    assert controller_cgroups(daemon_cgroup) == controller_cgroups(Path("/proc/self/cgroup").read_text())

    # 3. A crash: systemd restarts the daemon after RestartSec, and it answers again.
    killed = time.monotonic()
    os.kill(first_pid, signal.SIGKILL)
    assert wait_for(lambda: m.main_pid() not in (0, first_pid), timeout=60), m.diagnostics()
    assert time.monotonic() - killed >= THROTTLE_S - 1  # no crash loop
    assert m.show("NRestarts") == "1"
    check_answers(m)
    second_pid = m.main_pid()
    assert second_pid != first_pid

    # 4. reload: SIGHUP re-reads the config, and the same process keeps serving.
    reloaded = m.systemctl("reload", UNIT)
    assert reloaded.returncode == 0, reloaded.stderr + m.diagnostics()
    assert wait_for(lambda: "received SIGHUP" in m.daemon_log.read_text(errors="replace"), timeout=10), (
        m.diagnostics()
    )
    assert m.main_pid() == second_pid
    assert m.show("ActiveState") == "active"
    check_answers(m)

    # 5. stop: a clean exit (status 0, not death by signal), the socket removed, no restart.
    stopped = m.systemctl("stop", UNIT, timeout=60)
    assert stopped.returncode == 0, stopped.stderr + m.diagnostics()
    assert m.show("Result") == "success", m.diagnostics()
    assert m.show("ExecMainCode") == "1", m.diagnostics()  # CLD_EXITED
    assert m.show("ExecMainStatus") == "0", m.diagnostics()
    assert "stopped in" in m.daemon_log.read_text(errors="replace")
    assert not m.socket.exists()
    # While waiting to restart, a unit is in the sub-state "auto-restart", not "dead".
    assert m.show("SubState") == "dead"
    assert not wait_for(lambda: m.show("ActiveState") != "inactive", timeout=3)
    assert m.show("NRestarts") == "1"

    # 6. uninstall: disabled, the unit and its symlink gone.
    removed = m.mlxkvd("uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr + m.diagnostics()
    assert not unit_file.exists()
    assert not (m.unit_dir / "default.target.wants" / UNIT).exists()
    # Not "disabled": the unit file is gone, so systemd no longer knows it at all.
    after = m.systemctl("is-enabled", UNIT)
    assert after.returncode != 0 and after.stdout.strip() != "enabled", after
    assert "No such file" in after.stderr, after


@pytest.mark.parametrize("user_manager", [False], indirect=True, ids=["manager-without-XDG_CONFIG_HOME"])
def test_install_puts_the_unit_where_the_manager_looks_not_where_the_shell_says(user_manager):
    m = user_manager
    shell_config_home = Path(m.env["XDG_CONFIG_HOME"])
    assert m.unit_dir == m.home / ".config" / "systemd" / "user"
    # What `mlxkvd install` reads: systemd 252's show-environment, quoting included.
    assert m.systemctl("set-environment", "MLXKV_TEST=a b'c\\d").returncode == 0
    shown = parse_environment(m.systemctl("show-environment").stdout)
    assert shown["MLXKV_TEST"] == "a b'c\\d"
    assert "XDG_CONFIG_HOME" not in shown
    assert m.systemctl("unset-environment", "MLXKV_TEST").returncode == 0
    log_to_file(m)

    installed = m.mlxkvd("install")
    assert installed.returncode == 0, installed.stdout + installed.stderr + m.diagnostics()
    check_serves_at_once(m)
    assert (m.unit_dir / UNIT).is_file()
    assert not (shell_config_home / "systemd").exists()
    # The daemon's default config file follows the manager's environment too; install says so.
    config_file = m.home / ".config" / "mlxkv" / "mlxkvd.toml"
    assert f"mlxkvd: the service reads {config_file} " in installed.stdout
    assert m.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"

    removed = m.mlxkvd("uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr + m.diagnostics()
    assert not (m.unit_dir / UNIT).exists()
    assert not (m.unit_dir / "default.target.wants" / UNIT).exists()
    assert m.systemctl("is-active", UNIT).stdout.strip() == "inactive"
