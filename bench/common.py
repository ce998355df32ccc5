"""Shared pieces of the benchmarks: processes, models, measurements and reports (workload text:
``textgen``).

Every system a benchmark compares runs the same weights (SmolLM2-135M-Instruct dequantized
to float32) with the same BLAS (OpenBLAS preloaded, see ``mlxkvd.blas``): the benchmark
process re-executes itself with the preload before importing MLX, and every server it starts
inherits that environment.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
# The converted default model, its float32 copy and the BLAS shim live here, reused by runs.
MODEL_CACHE_DIR = RESULTS_DIR / "cache"


# --- environment ------------------------------------------------------------------------------


def ensure_blas() -> None:
    """Re-exec this process with OpenBLAS preloaded (Linux), before MLX is imported."""
    from mlxkvd import blas

    MODEL_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    blas.ensure_preloaded(MODEL_CACHE_DIR)


def blas_preloaded() -> bool:
    from mlxkvd import blas

    return blas.is_preloaded()


def child_env() -> dict[str, str]:
    """The environment for a server process: this one's BLAS preload, no stray mlxkvd config."""
    from mlxkvd import blas

    env = blas.preload_env(MODEL_CACHE_DIR) or dict(os.environ)
    for key in list(env):
        if key.startswith("MLXKV_") and key != "MLXKV_BLAS_PRELOADED":
            del env[key]
    env["MLXKV_CONFIG"] = ""
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start(out: Path, name: str, *, blas_threads: int | None = None) -> Path:
    """A benchmark's start: OpenBLAS preloaded (``blas_threads`` threads per process, servers
    included, when given), SIGTERM ends it cleanly, warnings logged, and ``out`` made. Returns
    ``out/<name>-work``, emptied: the servers' logs and caches of this run."""
    if blas_threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(blas_threads)  # before the re-exec: servers inherit it
    ensure_blas()  # re-execs once; everything after runs with OpenBLAS preloaded
    exit_on_sigterm()
    logging.basicConfig(level=logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    return fresh_workdir(out, f"{name}-work")


def fresh_workdir(out: Path, name: str) -> Path:
    """``out/name``, emptied: servers' logs and caches of this run only."""
    import shutil

    workdir = out / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_socket_dir() -> Path:
    """A short directory for Unix sockets (sun_path is limited to 104-108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="mlxkv-bench-"))


# --- models -----------------------------------------------------------------------------------


def model_dirs() -> tuple[Path, Path]:
    """(the daemon's default model dir, a float32 copy of it for mlx-lm and mlx_lm.server)."""
    from mlxkvd.convert import ensure_default_model

    default = ensure_default_model(MODEL_CACHE_DIR)
    f32 = default.parent / f"{default.name}-float32"
    if not (f32 / "config.json").is_file():
        _write_float32_model(default, f32)
    return default, f32


def _write_float32_model(src: Path, dst: Path) -> None:
    """The daemon's CPU weights (dequantized, float32) as a plain mlx-lm model directory."""
    import shutil

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, save_model

    model, tokenizer, config = load(str(src), return_config=True)
    dequantize_model(model)
    model.set_dtype(mx.float32)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=True)
    for path in src.iterdir():
        if path.suffix in (".json", ".jinja") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, tmp / path.name)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


@dataclass
class Generation:
    """One in-process generation, timed like a client would time a server."""

    text: str
    tokens: list[int]
    ttft_s: float
    total_s: float
    decode_tps: float  # (tokens - 1) / (end - first token), as measured for the servers
    mlx_generation_tps: float  # mlx-lm's own figure


class InProcess:
    """mlx-lm in this process: float32 weights, the reference for every other system."""

    def __init__(self, model_dir: Path):
        import mlx.core as mx
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))
        mx.eval(self.model.parameters())

    def render(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def generate(self, prompt: Sequence[int], max_tokens: int, cache: list | None = None) -> Generation:
        """Greedy generation from ``prompt`` (onto ``cache`` if given, else a fresh one)."""
        from mlx_lm import stream_generate

        started = time.perf_counter()
        first = None
        tokens: list[int] = []
        text = ""
        gen_tps = 0.0
        for response in stream_generate(
            self.model, self.tokenizer, list(prompt), max_tokens=max_tokens, prompt_cache=cache
        ):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(response.token))
            if not (response.finish_reason == "stop" and response.token in self.tokenizer.eos_token_ids):
                text += response.text
            gen_tps = response.generation_tps
        end = time.perf_counter()
        first = first or end
        decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0
        return Generation(text, tokens, first - started, end - started, decode, gen_tps)

    def prefill_delta_ttft(self, cache: list, held: Sequence[int], prompt: Sequence[int]) -> tuple[float, int]:
        """Trim ``cache`` (holding ``held``) to its common prefix with ``prompt``, then time
        prefilling the rest up to the first token. Returns (seconds, tokens prefilled)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import trim_prompt_cache

        offset = cache[0].offset
        held = list(held)[:offset]
        common = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        trim_prompt_cache(cache, offset - common)
        delta = mx.array(list(prompt[common:]), dtype=mx.uint32)
        started = time.perf_counter()
        for token, _ in generate_step(delta, self.model, max_tokens=1, prompt_cache=cache):
            int(token)
            break
        return time.perf_counter() - started, len(prompt) - common


def cache_holds(cache: list) -> int:
    return int(cache[0].offset)


def cache_nbytes(cache: list) -> int:
    return int(sum(c.nbytes for c in cache))


# --- servers ----------------------------------------------------------------------------------


# Run as ``python -c`` in front of a server's command line (Linux): the server gets SIGTERM when
# the benchmark process dies, so an interrupted run leaves no server behind (PR_SET_PDEATHSIG
# survives exec). A wrapper, not Popen's preexec_fn: with preexec_fn Python forks instead of
# vforking, which runs OpenBLAS's fork handler, and that deadlocks while its threads are busy.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # 1: PR_SET_PDEATHSIG
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop the servers."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class ServerProcess:
    """A subprocess with a log file; ``stop`` sends SIGTERM and waits."""

    proc: subprocess.Popen | None = None
    log_path: Path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _spawn(self, argv: list[str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if sys.platform.startswith("linux"):
                argv = [sys.executable, "-c", _DIE_WITH_PARENT, *argv]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env())

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{type(self).__name__} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class DaemonProcess(ServerProcess):
    """``python -m mlxkvd serve`` on a Unix socket; restartable on the same cache dir."""

    def __init__(self, socket_path: Path, cache_dir: Path, log_path: Path, model: Path | None = None,
                 extra_args: Sequence[str] = ()):
        self.socket_path = socket_path
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.model = model
        self.extra_args = list(extra_args)

    def start(self, timeout: float = 180.0) -> "DaemonProcess":
        from mlxkv import Client

        argv = [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(self.socket_path),
                "--cache-dir", str(self.cache_dir)]
        if self.model is not None:
            argv += ["--model", str(self.model)]
        self._spawn(argv + self.extra_args)
        deadline = time.monotonic() + timeout
        with Client(self.socket_path, connect_timeout=2.0) as client:
            while True:
                self._check_alive()
                try:
                    client.wait_ready(timeout=2.0)
                    return self
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"mlxkvd not ready after {timeout} s; see {self.log_path}")

    def restart(self) -> "DaemonProcess":
        self.stop()
        return self.start()


class MlxLmServer(ServerProcess):
    """``python -m mlx_lm.server`` on 127.0.0.1 with a local model path (no downloads)."""

    def __init__(self, model: Path, log_path: Path, cache_bytes: int | None = None,
                 cache_size: int = 1000):
        self.model = model
        self.log_path = log_path
        self.cache_bytes = cache_bytes
        self.cache_size = cache_size
        self.port = 0

    def start(self, timeout: float = 180.0) -> "MlxLmServer":
        self.port = free_port()
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(self.port), "--temp", "0.0",
                "--prompt-cache-size", str(self.cache_size), "--log-level", "WARNING"]
        if self.cache_bytes is not None:
            argv += ["--prompt-cache-bytes", str(self.cache_bytes)]
        self._spawn(argv)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlx_lm.server not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.2)

    def restart(self) -> "MlxLmServer":
        self.stop()
        return self.start()

    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int) -> "HttpTurn":
        """One streamed ``/v1/chat/completions`` call, timed from the request to each delta."""
        body = json.dumps({
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"mlx_lm.server answered {response.status}: {response.read()[:500]!r}")
        first = last = None
        chunks = 0
        gap = 0.0
        text = ""
        usage: dict[str, Any] = {}
        finish = None
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    first = first or now
                    gap = max(gap, now - (last or now))
                    last = now
                    chunks += 1
                    text += content
                finish = choice.get("finish_reason") or finish
        end = time.perf_counter()
        conn.close()
        return HttpTurn(text, started, first or end, last or end, end, chunks, usage, finish, gap)


def stream_turn(conv, content: str, max_tokens: int) -> tuple[float, float]:
    """One turn of an ``mlxkv`` Conversation, streamed: (time to the first token, turn time),
    client side; ``conv.last_turn`` then holds the daemon's accounting. The first token is
    its delta's arrival, text or not (a partial character or a space is held back from the
    text until the next token), which is what the in-process limit times too."""
    started = time.perf_counter()
    for _ in conv.stream(content, max_tokens=max_tokens):
        pass
    end = time.perf_counter()
    first = conv.last_turn.first_token_latency_s
    return (first if first is not None else end - started), end - started


@dataclass
class HttpTurn:
    text: str
    started: float
    first: float
    last: float
    end: float
    chunks: int
    usage: dict[str, Any]
    finish_reason: str | None
    max_gap: float = 0.0  # the longest time between two deltas


# --- memory -----------------------------------------------------------------------------------


def read_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class PeakRss:
    """Samples VmRSS of a process (``pid_of()`` is re-read: a restarted server changes pid)
    in a background thread; ``peak_bytes`` also folds in the kernel's VmHWM when asked."""

    def __init__(self, pid_of, interval: float = 0.05):
        self._pid_of = pid_of
        self._interval = interval
        self._stop = threading.Event()
        self.peak_kib = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample(include_hwm=False)
        self._stop.set()
        self._thread.join()

    def sample(self, include_hwm: bool = False) -> None:
        pid = self._pid_of()
        if pid is None:
            return
        for key in ("VmRSS", "VmHWM") if include_hwm else ("VmRSS",):
            value = read_status_kib(pid, key)
            if value is not None:
                self.peak_kib = max(self.peak_kib, value)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    @property
    def peak_bytes(self) -> int:
        return self.peak_kib * 1024


# --- reporting --------------------------------------------------------------------------------


def progress(total: int, desc: str):
    """A tqdm bar on stderr; plain lines where tqdm is not installed (the GPU machine)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="turn", dynamic_ncols=True, leave=True)


class _LineProgress:
    """The part of tqdm's interface the benchmarks use, as one stderr line per update."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.started = time.perf_counter()

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} [{time.perf_counter() - self.started:.0f} s] {self.postfix}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def git_state() -> str:
    """The checked-out commit, and "+ uncommitted changes" when the working tree has them:
    a benchmark of a daemon being edited should say which code it ran."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" + uncommitted changes" if dirty else "")


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "blas_preloaded": blas_preloaded(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import importlib.metadata as md

        info["mlx"] = md.version("mlx")
        info["mlx_lm"] = md.version("mlx-lm")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info
