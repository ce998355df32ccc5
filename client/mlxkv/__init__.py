"""mlxkv: the thin client of the mlxkv inference daemon.

    from mlxkv import Client

    with Client() as client:
        conv = client.conversation(system="You are terse.")
        print(conv.send("Hello!").text)

Imports only grpcio, protobuf and platformdirs: no MLX.
"""

from __future__ import annotations

from importlib import metadata

from mlxkv.client import Client
from mlxkv.conversation import Conversation, ToolCall, Turn
from mlxkv.errors import DaemonUnavailableError, MlxkvError, NotFoundError

try:
    __version__ = metadata.version("mlxkv")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "Client",
    "Conversation",
    "DaemonUnavailableError",
    "MlxkvError",
    "NotFoundError",
    "ToolCall",
    "Turn",
    "__version__",
]
