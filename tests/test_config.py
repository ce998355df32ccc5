"""The daemon's configuration: precedence, validation with the source named, `mlxkvd config`,
and the config-file rule shared with the client (`mlxkv.paths`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxkv import paths
from mlxkvd.config import FIELDS, Config, flag_name, load_config
from mlxkvd.daemon import _parser


def load(*argv: str, environ: dict[str, str] | None = None):
    return load_config(_parser().parse_args(["serve", *argv]), environ if environ is not None else {})


@pytest.fixture
def user_dirs(tmp_path, monkeypatch):
    """HOME and the XDG directories in tmp_path, no MLXKV_* variables: the user's real
    config file must not leak in."""
    for key in list(os.environ):
        if key.startswith(("MLXKV_", "XDG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def write_default_file(user_dirs: Path, text: str) -> Path:
    path = user_dirs / "config" / "mlxkv" / "mlxkvd.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_file_over_default(user_dirs):
    path = write_default_file(user_dirs, 'max_cache_bytes = "3MiB"\nkv_bits = 4\ndefault_max_tokens = 100\n')
    environ = {"MLXKV_KV_BITS": "8", "MLXKV_DEFAULT_MAX_TOKENS": "200"}
    config, sources = load("--default-max-tokens", "300", environ=environ)
    assert config.default_max_tokens == 300
    assert sources["default_max_tokens"] == "flag --default-max-tokens"
    assert config.kv_bits == 8
    assert sources["kv_bits"] == "env MLXKV_KV_BITS"
    assert config.max_cache_bytes == 3 * 1024**2
    assert sources["max_cache_bytes"] == f"file {path}"
    assert config.log_level == "INFO"
    assert sources["log_level"] == "default"
    assert config.cache_dir == user_dirs / "cache" / "mlxkv"  # the default follows XDG_CACHE_HOME


def test_config_file_location_flag_then_env_then_default(user_dirs, tmp_path):
    write_default_file(user_dirs, "kv_bits = 4\n")
    other = tmp_path / "other.toml"
    other.write_text("kv_bits = 8\n")
    assert load()[0].kv_bits == 4
    assert load(environ={"MLXKV_CONFIG": str(other)})[0].kv_bits == 8
    assert load("--config", str(other), environ={"MLXKV_CONFIG": "/nonexistent.toml"})[0].kv_bits == 8
    # Set but empty: no config file at all.
    assert load(environ={"MLXKV_CONFIG": ""})[0].kv_bits == 0


def test_unknown_keys_are_rejected_naming_the_file_and_key(user_dirs):
    path = write_default_file(user_dirs, 'max-cache-bytes = "1GiB"\nkv_bits = 4\n')
    with pytest.raises(ValueError) as err:
        load()
    assert str(err.value).startswith(f"{path}: unknown settings max-cache-bytes (known: socket, model")


@pytest.mark.parametrize(
    ("file_text", "argv", "environ", "message"),
    [
        ("kv_bits = 3\n", (), {}, "kv_bits from file {file}: kv-bits must be 0 (full precision), 4 or 8, got 3"),
        ("kv_bits = true\n", (), {}, "kv_bits from file {file}: expected a number, got true"),
        ("default_max_tokens = 1.5\n", (), {}, "default_max_tokens from file {file}: expected an integer, got 1.5"),
        ("log_level = 'loud'\n", (), {}, "log_level from file {file}: log level must be one of DEBUG"),
        ("model = 7\n", (), {}, "model from file {file}: expected a path, got 7"),
        ("", (), {"MLXKV_MAX_CACHE_BYTES": "lots"}, "max_cache_bytes from env MLXKV_MAX_CACHE_BYTES: not a size: 'lots'"),
        ("", (), {"MLXKV_CACHE_TTL_S": "-1"}, "cache_ttl_s from env MLXKV_CACHE_TTL_S: must be >= 0"),
        ("", ("--default-max-tokens", "0"), {}, "default_max_tokens from flag --default-max-tokens: must be a positive"),
        ("kv_bits = \n", (), {}, "{file}: not valid TOML"),
    ],
)
def test_bad_values_are_rejected_naming_the_setting_and_source(user_dirs, file_text, argv, environ, message):
    path = write_default_file(user_dirs, file_text)
    with pytest.raises(ValueError) as err:
        load(*argv, environ=environ)
    assert str(err.value).startswith(message.format(file=path))


def test_a_missing_explicit_config_file_is_an_error(user_dirs):
    with pytest.raises(ValueError, match=r"config file /no/such\.toml \(from --config\) does not exist"):
        load("--config", "/no/such.toml")
    with pytest.raises(ValueError, match=r"\(from \$MLXKV_CONFIG\) does not exist"):
        load(environ={"MLXKV_CONFIG": "/no/such.toml"})
    # The default file is optional.
    assert load()[1]["kv_bits"] == "default"


def test_relative_paths_in_the_file_are_relative_to_the_file(user_dirs, monkeypatch, tmp_path):
    path = write_default_file(user_dirs, 'socket = "run/d.sock"\ncache_dir = "~/c"\nmodel = "/abs/m"\n')
    monkeypatch.chdir(tmp_path)
    config, _ = load()
    assert config.socket_path() == path.parent / "run" / "d.sock"
    assert config.cache_dir == user_dirs / "c"
    assert config.model == Path("/abs/m")


def test_daemon_and_client_pick_the_same_socket(user_dirs, monkeypatch):
    default = paths.default_socket_path()
    assert paths.resolve_socket_path() == load()[0].socket_path() == default
    path = write_default_file(user_dirs, 'socket = "/tmp/from-file.sock"\n')
    assert paths.resolve_socket_path() == load()[0].socket_path() == Path("/tmp/from-file.sock")
    monkeypatch.setenv("MLXKV_SOCKET", "/tmp/from-env.sock")
    assert paths.resolve_socket_path() == load(environ=dict(os.environ))[0].socket_path() == Path("/tmp/from-env.sock")
    assert paths.resolve_socket_path("/tmp/flag.sock") == Path("/tmp/flag.sock")
    assert load("--socket", "/tmp/flag.sock", environ=dict(os.environ))[0].socket_path() == Path("/tmp/flag.sock")
    monkeypatch.delenv("MLXKV_SOCKET")
    # A file the daemon would reject: the client falls back to the default, with a warning.
    path.write_text("socket = [")
    assert paths.resolve_socket_path() == default


def test_an_explicit_config_without_socket_does_not_inherit_the_default_files(user_dirs, tmp_path):
    write_default_file(user_dirs, 'socket = "/tmp/default-file.sock"\n')
    other = tmp_path / "other.toml"
    other.write_text("kv_bits = 4\n")
    assert load("--config", str(other))[0].socket_path() == paths.default_socket_path()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().kv_bits = 4  # type: ignore[misc]


def test_client_paths_do_not_import_the_server():
    code = (
        "import sys, mlxkv.paths, mlxkv.client, mlxkv.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlxkvd', 'mlx', 'mlx_lm'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def run_config_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", "config", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_config_command_prints_each_value_and_its_source(user_dirs):
    path = write_default_file(user_dirs, 'max_cache_bytes = "1MiB"\n')
    env = {**os.environ, "MLXKV_KV_BITS": "8"}
    proc = run_config_command("--log-level", "debug", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert lines["log_level"].split()[1] == "DEBUG"
    assert "(flag --log-level; env MLXKV_LOG_LEVEL; reloadable)" in lines["log_level"]
    assert lines["kv_bits"].split()[1] == "8"
    assert "(env MLXKV_KV_BITS;" in lines["kv_bits"]
    assert lines["max_cache_bytes"].split()[1] == str(1024**2)
    assert f"(file {path};" in lines["max_cache_bytes"]
    assert lines["default_max_tokens"].split()[1] == "512"
    assert "(default;" in lines["default_max_tokens"]
    assert lines["socket"].split()[1] == str(paths.default_socket_path())


def test_config_command_rejects_a_bad_value_with_exit_2(user_dirs):
    write_default_file(user_dirs, "kv_bits = 5\n")
    proc = run_config_command(env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stderr.startswith("mlxkvd: error: kv_bits from file")


def test_readme_documents_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [flag_name(name) for name in FIELDS
               if f"`{flag_name(name)} " not in readme and f"`{flag_name(name)}` |" not in readme]
    assert not missing, f"README's option table lacks {missing}"
