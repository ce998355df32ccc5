"""The daemon's configuration: declared once, filled from flags, environment and a TOML file.

Precedence, highest first: command-line flag, ``MLXKV_*`` environment variable, the config
file (``--config`` or ``<user config dir>/mlxkv/mlxkvd.toml``), the default. ``Config`` is
frozen; every module receives the plain values it needs, never the argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import platformdirs

from mlxkv.paths import APP_NAME, SOCKET_ENV, resolve_socket_path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; ``"500M"`` -> 500000000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 2GB, 1000000)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if "i" in unit:
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit.rstrip("b") if unit != "b" else "b"]
    return int(number * scale)


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def _optional_path(value: Any) -> Path | None:
    return _path(value) if value not in (None, "") else None


def _kv_bits(value: Any) -> int:
    bits = int(value)
    if bits not in (0, 4, 8):
        raise ValueError("kv-bits must be 0 (full precision), 4 or 8")
    return bits


def _positive_int(value: Any) -> int:
    n = int(value)
    if n <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return n


def _non_negative_float(value: Any) -> float:
    x = float(value)
    if x < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return x


def _setting(help: str, parse: Callable[[Any], Any], default: Any = None, metavar: str = ""):
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "mlxkvd.toml"


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told. Each field is a flag, an env var and a TOML key."""

    socket: Path | None = _setting(
        f"Unix socket path (default: per-user runtime dir; env {SOCKET_ENV})",
        _optional_path,
        metavar="PATH",
    )
    model: Path | None = _setting(
        "mlx-lm model directory (default: the embedded SmolLM2-135M-Instruct)",
        _optional_path,
        metavar="DIR",
    )
    cache_dir: Path = _setting(
        "directory for the converted default model and the disk KV tier",
        _path,
        default_cache_dir(),
        "DIR",
    )
    max_cache_bytes: int = _setting(
        "memory budget for resident KV caches (e.g. 2GiB)", parse_size, 2 * 1024**3, "SIZE"
    )
    max_disk_bytes: int = _setting(
        "budget of the disk KV tier (0 disables it)", parse_size, 20 * 1024**3, "SIZE"
    )
    kv_bits: int = _setting("quantize KV caches to 4 or 8 bits (0: full precision)", _kv_bits, 0, "N")
    default_max_tokens: int = _setting(
        "max tokens per turn when a request does not say", _positive_int, 512, "N"
    )
    cache_ttl_s: float = _setting(
        "drop caches idle longer than this many seconds (0: never)", _non_negative_float, 0.0, "S"
    )
    max_message_bytes: int = _setting(
        "largest gRPC request accepted", parse_size, 16 * 1024**2, "SIZE"
    )
    log_level: str = _setting("logging level", lambda v: str(v).upper(), "INFO", "LEVEL")

    def socket_path(self) -> Path:
        return resolve_socket_path(self.socket)

    def disk_dir(self) -> Path:
        return self.cache_dir / "kv"


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def env_name(name: str) -> str:
    return SOCKET_ENV if name == "socket" else f"MLXKV_{name.upper()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Config field; unset flags stay None so other sources can fill them."""
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    for name, f in FIELDS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=f.metadata["metavar"] or None,
            help=f"{f.metadata['help']} [env {env_name(name)}]",
        )


def load_config(
    args: argparse.Namespace | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Build the Config and, for each field, where its value came from."""
    environ = os.environ if environ is None else environ
    flags = vars(args) if args is not None else {}
    file = flags.get("config") or environ.get("MLXKV_CONFIG")
    file_path = _path(file) if file else default_config_file()
    file_values: dict[str, Any] = {}
    if file_path.is_file():
        with file_path.open("rb") as fh:
            file_values = tomllib.load(fh)
        unknown = set(file_values) - set(FIELDS)
        if unknown:
            raise ValueError(f"{file_path}: unknown settings {', '.join(sorted(unknown))}")
    elif file:
        raise ValueError(f"config file {file_path} does not exist")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, f in FIELDS.items():
        for source, raw in (
            ("flag", flags.get(name)),
            (f"env {env_name(name)}", environ.get(env_name(name))),
            (f"file {file_path}", file_values.get(name)),
        ):
            if raw is not None and raw != "":
                try:
                    values[name] = f.metadata["parse"](raw)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{name} from {source}: {exc}") from exc
                sources[name] = source
                break
        else:
            sources[name] = "default"
    return Config(**values), sources
