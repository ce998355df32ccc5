"""A real daemon serving the HTTP gateway, for the tests of the OpenAI and Anthropic APIs."""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HttpDaemon:
    daemon: Daemon
    port: int
    key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """A raw request (what the SDKs cannot send); the status and the JSON body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, json.loads(data) if data else None


def start(tmp: Path, cache_dir: Path, *extra_args: str) -> HttpDaemon:
    """``mlxkvd serve --http 127.0.0.1:PORT`` with its key file in ``tmp``."""
    port = free_port()
    key_file = tmp / "api-key"
    sock_dir = Path(tempfile.mkdtemp(prefix="mlxkv-"))
    daemon = Daemon(
        socket=sock_dir / "d.sock", cache_dir=cache_dir, log_path=tmp / "daemon.log",
        extra_args=["--http", f"127.0.0.1:{port}", "--http-api-key-file", str(key_file),
                    "--max-disk-bytes", "0", *extra_args],
    ).start()
    served = HttpDaemon(daemon, port, key_file.read_text().strip())

    def healthy() -> bool:
        try:
            return served.request("GET", "/health")[0] == 200
        except OSError:
            return False

    wait_for(healthy, timeout=30)
    return served
