"""The client's exceptions: every failed RPC is an ``MlxkvError`` carrying its gRPC status code,
never a raw ``grpc.RpcError``."""

from __future__ import annotations

from pathlib import Path

import grpc

START_HINT = (
    "start one with `mlxkvd serve` (or let `mlxkv --start` do it), or `mlxkvd install` to run "
    "it as a background service"
)


class MlxkvError(Exception):
    """An RPC to the daemon failed. ``code`` is the ``grpc.StatusCode``, ``details`` its text."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.details} ({self.code.name})"


class DaemonUnavailableError(MlxkvError):
    """No daemon answers on the socket; the message says how to start one."""

    def __init__(self, socket_path: str | Path, reason: str) -> None:
        self.socket_path = Path(socket_path)
        self.reason = reason
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"no mlxkv daemon is answering at {self.socket_path} ({reason}); {START_HINT}",
        )

    def __str__(self) -> str:
        return self.details


class NotFoundError(MlxkvError):
    """The daemon does not know the named conversation (NOT_FOUND)."""
