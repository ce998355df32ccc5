"""The daemon's configuration: declared once, filled from flags, environment and a TOML file.

Precedence, highest first: command-line flag, ``MLXKV_*`` environment variable, the config
file (``--config``, else ``$MLXKV_CONFIG``, else ``<user config dir>/mlxkv/mlxkvd.toml``; the
rule lives in ``mlxkv.paths`` so that clients find the same file), the default. ``Config`` is
frozen; every module receives the plain values it needs, never the argparse namespace.

Some settings can change while the daemon runs (``reload=True``: SIGHUP re-reads the file);
the others need a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import platformdirs

from mlxkv.paths import APP_NAME, CONFIG_ENV, SOCKET_ENV, anchor, config_file, default_config_dir, default_socket_path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
API_KEY_NAME = "api-key"  # the HTTP APIs' key file, in the user config directory


def _not_bool(value: Any) -> Any:
    # TOML booleans are Python bools, and bool is an int: `kv_bits = true` must not mean 1.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def parse_size(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; ``"500M"`` -> 500000000; plain integers are bytes."""
    if isinstance(_not_bool(text), int):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
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


# gRPC keeps message limits in a signed 32-bit int; a limit under a few KiB would refuse even
# a health check. Requests are bounded to this range.
MIN_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 1024**3


def _message_size(value: Any) -> int:
    size = parse_size(value)
    if not MIN_MESSAGE_BYTES <= size <= MAX_MESSAGE_BYTES:
        raise ValueError(f"max-message-bytes must be between 64KiB and 1GiB, got {value!r}")
    return size


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value).expanduser()


def _optional_path(value: Any) -> Path | None:
    return _path(value) if value not in (None, "") else None


def _template(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a file or a template name, got {value!r}")
    return os.fspath(value)


def _context_caps(value: Any) -> dict[str, int]:
    """Context window caps by model name: ``8192`` (every model), ``"NAME=8192,OTHER=4096"`` or
    a TOML table; ``*`` names every model without a cap of its own. {} caps nothing."""
    if value in (None, "", {}):
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(_not_bool(value), int) or str(value).strip().isdigit():
        items = [("*", value)]
    else:
        items = []
        for part in str(value).split(","):
            name, sep, n = part.strip().rpartition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected N or NAME=N,... (* for every model), got {value!r}")
            items.append((name.strip(), n))
    caps = {str(name): _positive_int(n) for name, n in items}
    return caps


SPECULATIVE = ("off", "prompt-lookup", "draft")


def _speculative(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {value!r}")
    return text


def _int(value: Any) -> int:
    _not_bool(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None


def _kv_bits(value: Any) -> int:
    bits = _int(value)
    if bits not in (0, 4, 8):
        raise ValueError(f"kv-bits must be 0 (full precision), 4 or 8, got {value!r}")
    return bits


def _positive_int(value: Any) -> int:
    n = _int(value)
    if n <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return n


def _non_negative_float(value: Any) -> float:
    try:
        x = float(_not_bool(value))
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not x >= 0:  # NaN too
        raise ValueError(f"must be >= 0, got {value!r}")
    return x


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _http_address(value: Any) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6), normalised; "" turns the gateway off."""
    if value in (None, ""):
        return ""
    host, sep, port = str(value).strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080), got {value!r}")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {value!r}")
    return level


def _setting(
    help: str,
    parse: Callable[[Any], Any],
    default: Any = None,
    metavar: str = "",
    *,
    reload: bool = False,
    default_factory: Callable[[], Any] | None = None,
):
    # A boolean setting is a flag without a value on the command line (``--name``).
    metadata = {"help": help, "parse": parse, "metavar": metavar, "reload": reload, "switch": parse is _bool}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told. Each field is a flag, an env var and a TOML key."""

    socket: Path | None = _setting(
        "Unix socket path (default: the per-user runtime directory)",
        _optional_path,
        metavar="PATH",
    )
    model: Path | None = _setting(
        "the model loaded at start: an mlx-lm model directory or a catalogue name (`mlxkv "
        "models`); requests may name another (default: the embedded SmolLM2-135M-Instruct)",
        _optional_path,
        metavar="DIR|NAME",
    )
    draft_model: Path | None = _setting(
        "a small model with the same tokenizer, loaded at start, that drafts tokens for "
        "speculative decoding (--speculative draft, or per request): a directory or a "
        "catalogue name",
        _optional_path,
        metavar="DIR|NAME",
    )
    models_dir: Path | None = _setting(
        "a directory of mlx-lm models for the catalogue requests choose from, besides the "
        "Hugging Face cache and LM Studio's models",
        _optional_path,
        metavar="DIR",
    )
    context_length: dict = _setting(
        "cap models' context windows: N for every model, or NAME=N,... (* for the others)",
        _context_caps,
        metavar="N|NAME=N,...",
        default_factory=dict,
    )
    chat_template: str | None = _setting(
        "a chat template replacing the model's: a Jinja file, or a bundled one by name "
        "(chatml-tools: ChatML with tool calls, for the default model); applies to the model "
        "loaded at start",
        _template,
        metavar="FILE|NAME",
    )
    cache_dir: Path = _setting(
        "directory for the converted default model and the disk KV tier",
        _path,
        metavar="DIR",
        default_factory=default_cache_dir,
    )
    max_cache_bytes: int = _setting(
        "memory budget for resident KV caches (e.g. 2GiB)",
        parse_size,
        2 * 1024**3,
        "SIZE",
        reload=True,
    )
    max_disk_bytes: int = _setting(
        "budget of the disk KV tier (0 disables it)", parse_size, 20 * 1024**3, "SIZE"
    )
    kv_bits: int = _setting("quantize KV caches to 4 or 8 bits (0: full precision)", _kv_bits, 0, "N")
    default_max_tokens: int = _setting(
        "max tokens per turn when a request does not say", _positive_int, 512, "N", reload=True
    )
    cache_ttl_s: float = _setting(
        "drop caches idle longer than this many seconds (0: never)",
        _non_negative_float,
        0.0,
        "S",
        reload=True,
    )
    write_behind_delay_s: float = _setting(
        "after a turn, how long the daemon is idle before writing caches to the disk tier",
        _non_negative_float,
        1.0,
        "S",
    )
    idle_unload_s: float = _setting(
        "unload the model (caches go to disk) after this many seconds without a turn; "
        "the next turn loads it again (0: never)",
        _non_negative_float,
        0.0,
        "S",
        reload=True,
    )
    speculative: str = _setting(
        "speculative decoding of greedy turns: off, prompt-lookup (drafts copied from the "
        "conversation, for answers that repeat it: code edits) or draft (drafts from "
        "--draft-model); a request may choose",
        _speculative,
        "off",
        "MODE",
        reload=True,
    )
    max_batch: int = _setting(
        "turns of different conversations decoded together at most (1: one at a time)",
        _positive_int,
        8,
        "N",
    )
    max_conversations: int = _setting(
        "conversations remembered; beyond that the least recently used is forgotten, caches too",
        _positive_int,
        10_000,
        "N",
    )
    max_message_bytes: int = _setting(
        "largest request accepted, gRPC message or HTTP body (64KiB to 1GiB)", _message_size, 16 * 1024**2, "SIZE"
    )
    http: str = _setting(
        "serve the OpenAI and Anthropic HTTP APIs on HOST:PORT (off when empty); "
        "loopback addresses only, unless --http-allow-any-address",
        _http_address,
        "",
        "HOST:PORT",
    )
    http_allow_any_address: bool = _setting(
        "let --http listen on a non-loopback address (anyone who can reach it and has the "
        "API key can use the model)",
        _bool,
        False,
    )
    http_api_key_file: Path | None = _setting(
        "the HTTP APIs' key file, created (0600) with a new key if missing "
        "(default: api-key in the user config directory)",
        _optional_path,
        metavar="FILE",
    )
    shutdown_grace_s: float = _setting(
        "on SIGTERM, how long running turns may go on before they are cancelled",
        _non_negative_float,
        10.0,
        "S",
    )
    log_level: str = _setting(
        "logging level: DEBUG, INFO, WARNING or ERROR", _log_level, "INFO", "LEVEL", reload=True
    )

    def socket_path(self) -> Path:
        """The socket to listen on; flag, env and file were already applied to ``socket``."""
        return self.socket or default_socket_path()

    def disk_dir(self) -> Path:
        return self.cache_dir / "kv"

    def api_key_path(self) -> Path:
        """The HTTP APIs' key file."""
        return self.http_api_key_file or default_config_dir() / API_KEY_NAME


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
RELOADABLE = frozenset(name for name, f in FIELDS.items() if f.metadata["reload"])
_PATH_PARSERS = (_path, _optional_path)


def env_name(name: str) -> str:
    return SOCKET_ENV if name == "socket" else f"MLXKV_{name.upper()}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Config field; unset flags stay None so other sources can fill them."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML config file (default: $MLXKV_CONFIG, else {config_file({})})",
    )
    for name, f in FIELDS.items():
        help = f"{f.metadata['help']} [env {env_name(name)}]"
        if f.metadata["switch"]:
            parser.add_argument(flag_name(name), dest=name, action="store_const", const=True, default=None, help=help)
            continue
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            metavar=f.metadata["metavar"] or None,
            help=help,
        )


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file; ValueError naming the file for anything wrong with it."""
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {', '.join(sorted(unknown))} "
            f"(known: {', '.join(FIELDS)})"
        )
    return {
        # Relative paths in the file are relative to the file, not to the working directory.
        name: anchor(raw, path) if FIELDS[name].metadata["parse"] in _PATH_PARSERS
        and isinstance(raw, str) and raw else raw
        for name, raw in values.items()
    }


def load_config(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Build the Config and, for each field, where its value came from.

    Raises ValueError whose message names the setting and its source.
    """
    environ = os.environ if environ is None else environ
    flags = vars(args) if args is not None else {}
    file_path = flags.get("config")
    if file_path is not None:
        file_path = Path(file_path).expanduser()
        if not file_path.is_file():
            raise ValueError(f"config file {file_path} (from --config) does not exist")
    else:
        file_path = config_file(environ)
        if file_path is not None and environ.get(CONFIG_ENV) and not file_path.is_file():
            raise ValueError(f"config file {file_path} (from ${CONFIG_ENV}) does not exist")
    file_values = read_config_file(file_path) if file_path is not None and file_path.is_file() else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, f in FIELDS.items():
        for source, raw in (
            (f"flag {flag_name(name)}", flags.get(name)),
            (f"env {env_name(name)}", environ.get(env_name(name))),
            (f"file {file_path}", file_values.get(name)),
        ):
            if raw is not None and raw != "":
                try:
                    values[name] = f.metadata["parse"](raw)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{name} from {source}: {exc}") from None
                sources[name] = source
                break
        else:
            sources[name] = "default"
    if values.get("speculative") == "draft" and values.get("draft_model") is None:
        raise ValueError(f"speculative from {sources['speculative']}: 'draft' needs a draft model (--draft-model)")
    return Config(**values), sources


def config_file_in_use(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file ``load_config`` reads for these flags, or None (whether it exists or not)."""
    flags = vars(args) if args is not None else {}
    if flags.get("config") is not None:
        return Path(flags["config"]).expanduser()
    return config_file(os.environ if environ is None else environ)


def changed_settings(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{name: (old, new)}`` for every setting whose value differs."""
    return {
        name: (getattr(old, name), getattr(new, name))
        for name in FIELDS
        if getattr(old, name) != getattr(new, name)
    }

