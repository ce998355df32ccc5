"""Where the gateway listens, and uvicorn serving it on a thread of its own.

Loopback addresses only (127.0.0.0/8, ::1, "localhost") unless the daemon is told otherwise
(``--http-allow-any-address``): the API key is the only thing between the network and the
model. The socket is bound here, before uvicorn starts, so that an address in use is an error
of ``start`` rather than a log line of a dying thread.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class ListenError(Exception):
    """The gateway cannot listen where it was told to; the message says why."""


def listen_address(value: str, allow_any_address: bool) -> tuple[str, int]:
    """``HOST:PORT`` (as ``config`` normalises it) as a host and port; ``ListenError`` for a
    non-loopback host unless ``allow_any_address``."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if host.lower() == "localhost":
        return host, int(port)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_any_address:
        raise ListenError(
            f"--http {value}: not a loopback address (127.0.0.1, ::1 or localhost); anyone who can "
            "reach it could use the model with the API key. Pass --http-allow-any-address "
            "(MLXKV_HTTP_ALLOW_ANY_ADDRESS=1) to listen there anyway"
        )
    return host, int(port)


class HttpServer:
    """uvicorn serving ``app`` on ``host:port``, on its own thread and event loop."""

    def __init__(self, app: ASGIApp, host: str, port: int, *, shutdown_grace_s: float):
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_grace_s = shutdown_grace_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None  # where it listens once started

    def start(self) -> None:
        """Bind and serve; ``ListenError`` if the address cannot be used."""
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.address = sock.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            ws="none",
            log_config=None,  # the daemon's logging
            access_log=False,
            proxy_headers=False,
            # In-flight requests get the daemon's shutdown grace, then are cancelled.
            timeout_graceful_shutdown=math.ceil(self.shutdown_grace_s),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="mlxkv-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise ListenError(f"the HTTP server on {self.host}:{self.port} did not start (see the log)")
            time.sleep(0.01)
        log.info("serving the OpenAI and Anthropic APIs on http://%s", self.url_host())

    def url_host(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace, then stop."""
        if self._server is None:
            return
        self._server.should_exit = True
        self._thread.join()
