"""mlxkvd: the mlxkv daemon. One MLX model, per-conversation KV caches, gRPC on a Unix socket."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("mlxkv")
except Exception:  # noqa: BLE001 - running from a source tree
    __version__ = "0.0.0"
