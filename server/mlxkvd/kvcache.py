"""The cache store's adapter for mlx-lm prompt caches (a list of per-layer cache objects).

Everything the store (``store.py``) needs to do with a cache — measure, trim, copy a prefix,
save, load, read a file's metadata — and nothing else. Files are mlx-lm's own prompt-cache
format (safetensors with metadata, ``mlx_lm.models.cache.save_prompt_cache``), so they stay
readable by mlx-lm; only the used ``[:offset]`` part of each layer is written.

Integrity: ``save`` adds a ``checksum`` entry to the metadata, the sha256 of the other metadata
entries (which carry the token ids) and of every array's bytes; ``load`` recomputes it and raises
``CacheFileError`` on any mismatch. Atomicity (temporary name + rename) is the store's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from .store import CacheFileError

_CHECKSUM = "checksum"
# A safetensors header larger than this is not one we wrote (tokens are ~6 bytes each).
_MAX_HEADER_BYTES = 256 * 1024 * 1024


class MlxCacheOps:
    """``store.CacheOps`` for mlx-lm caches (``make_prompt_cache(model)``)."""

    file_suffix = ".safetensors"  # mx.save_safetensors appends it to any other name

    def nbytes(self, cache: list) -> int:
        """Allocated bytes (KVCache grows in 256-token steps), not bytes of tokens used."""
        return sum(c.nbytes for c in cache)

    def num_tokens(self, cache: list) -> int | None:
        """Tokens the cache holds, or None if no layer counts them (recurrent layers only)."""
        for c in cache:
            offset = getattr(c, "offset", None)
            if isinstance(offset, int):
                return offset
        return None

    def can_trim(self, cache: list) -> bool:
        return can_trim_prompt_cache(cache)

    def trim(self, cache: list, n: int) -> None:
        """Drop the last ``n`` tokens, in place (the allocation is kept for the next prefill)."""
        trimmed = trim_prompt_cache(cache, n)
        if trimmed != n:
            raise ValueError(f"trimmed {trimmed} tokens instead of {n}")

    def copy_prefix(self, cache: list, n: int) -> list:
        """New cache objects holding copies of the first ``n`` tokens of every layer.

        The copy is allocated in the cache's own 256-token steps, so the next prefill writes in
        place, and is evaluated at once, so it holds no reference to the source's buffers.
        Layers other than KVCache / QuantizedKVCache can only be copied whole.
        """
        copies = [_copy_layer(c, n) for c in cache]
        mx.eval([c.state for c in copies])
        return copies

    def nbytes_with_room(self, cache: list, tokens: int) -> int:
        """``nbytes`` once ``make_room(cache, tokens)`` has run."""
        total = 0
        for c in cache:
            allocated = _allocated(c)
            if allocated is None or c.offset + tokens <= allocated:
                total += c.nbytes
            else:
                total += c.nbytes // allocated * _rounded(c, c.offset + tokens)
        return total

    def make_room(self, cache: list, tokens: int) -> None:
        """Reallocate every KVCache / QuantizedKVCache layer with room for ``tokens`` more
        tokens after its ``offset`` (in its 256-token steps), so that mlx-lm's next
        ``update_and_fetch`` writes in place rather than copying the layer to grow it."""
        grown = []
        for c in cache:
            allocated = _allocated(c)
            if allocated is None or c.offset + tokens <= allocated:
                continue
            n, size = c.offset, _rounded(c, c.offset + tokens)

            def copy(x, n=n, size=size):
                out = mx.zeros((*x.shape[:-2], size, x.shape[-1]), dtype=x.dtype)
                out[..., :n, :] = x[..., :n, :]
                return out

            c.keys, c.values = tree_map(copy, (c.keys, c.values))
            grown.append(c)
        mx.eval([(c.keys, c.values) for c in grown])

    def snapshot(self, cache: list) -> list | None:
        """A copy of ``cache``'s used part that ``save`` writes without any MLX work (new layer
        objects holding evaluated arrays of exactly ``[:offset]``, laid out in order), so that a
        thread can write it while the engine goes on; None where a layer is not a KVCache or a
        QuantizedKVCache."""
        if not all(isinstance(c, (KVCache, QuantizedKVCache)) for c in cache):
            return None
        copies = []
        for c in cache:
            new = type(c).__new__(type(c))
            new.__dict__.update(c.__dict__)  # offset, step, group_size, bits, ...
            if c.keys is not None:
                new.keys, new.values = tree_map(lambda x, n=c.offset: mx.contiguous(x[..., :n, :]),
                                                (c.keys, c.values))
            copies.append(new)
        mx.eval([c.state for c in copies])
        return copies

    def save(self, path: Path, cache: list, metadata: dict[str, str]) -> None:
        """Write ``cache`` (its used part) and ``metadata`` plus a checksum to ``path``. A
        ``snapshot`` is written as it is, with no MLX work (from any thread)."""
        if not str(path).endswith(self.file_suffix):
            raise ValueError(f"{path} must end with {self.file_suffix}")
        if any("." in k for k in metadata) or _CHECKSUM in metadata:
            raise ValueError("metadata keys must not contain '.' nor be 'checksum'")
        used = [_used_part(c) for c in cache]
        full = dict(metadata)
        full[_CHECKSUM] = _checksum(used, metadata)
        save_prompt_cache(str(path), used, full)

    def load(self, path: Path) -> tuple[list, dict[str, str]]:
        """Read a file written by ``save``; ``CacheFileError`` if it is unreadable or altered."""
        self.read_metadata(path)  # header and length checks first: mx.load trusts the header
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            mx.eval([c.state for c in cache])
        except Exception as e:
            raise CacheFileError(f"unreadable: {e}") from e
        metadata = dict(metadata)
        stored = metadata.pop(_CHECKSUM, None)
        if stored is None or stored != _checksum(cache, metadata):
            raise CacheFileError("checksum mismatch")
        return cache, metadata

    def read_metadata(self, path: Path) -> dict[str, str]:
        """The metadata ``save`` was given (checksum included), from the safetensors header
        alone: no array is read. Raises ``CacheFileError`` if the header is malformed or the
        file is shorter than the header says."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(_MAX_HEADER_BYTES, size - 8):
                    raise CacheFileError("header length beyond the end of the file")
                header = json.loads(f.read(header_len))
            data_len = max((t["data_offsets"][1] for k, t in header.items()
                            if k != "__metadata__"), default=0)
            if 8 + header_len + data_len != size:
                expected = 8 + header_len + data_len
                raise CacheFileError(f"{size} bytes, the header describes {expected}")
            raw = header.get("__metadata__", {})
        except CacheFileError:
            raise
        except (OSError, ValueError, KeyError, TypeError, struct.error, AttributeError) as e:
            raise CacheFileError(f"malformed header: {e}") from e
        # save_prompt_cache flattens [metadata, classes, scalars]: ours are the "0." entries.
        return {k[2:]: v for k, v in raw.items() if k.startswith("0.")}


def _copy_layer(c, n: int):
    if isinstance(c, (KVCache, QuantizedKVCache)):
        new = type(c).__new__(type(c))
        new.__dict__.update(c.__dict__)  # group_size, bits, ...
        new.offset = n
        if c.keys is None or n == 0:
            new.keys = new.values = None
            new.offset = 0
            return new
        allocated = (n + c.step - 1) // c.step * c.step

        def copy(x):
            out = mx.zeros((*x.shape[:-2], allocated, x.shape[-1]), dtype=x.dtype)
            out[..., :n, :] = x[..., :n, :]
            return out

        new.keys, new.values = tree_map(copy, (c.keys, c.values))
        return new
    if n != getattr(c, "offset", n):
        raise ValueError(f"cannot copy a {n}-token prefix of a {type(c).__name__}")
    copied = tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, c.state)
    new = type(c).from_state(copied)
    for attr, value in vars(c).items():  # non-state attributes (max_size, keep, ...)
        if not hasattr(new, attr):
            setattr(new, attr, value)
    return new


def _allocated(c) -> int | None:
    """Tokens a KVCache / QuantizedKVCache layer has room for, None for other layers."""
    if not isinstance(c, (KVCache, QuantizedKVCache)) or c.keys is None:
        return None
    keys = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
    return keys.shape[-2]


def _rounded(c, n: int) -> int:
    return (n + c.step - 1) // c.step * c.step


def _used_part(c):
    """A view of a layer holding only its ``[:offset]`` tokens (what is worth writing)."""
    if not isinstance(c, (KVCache, QuantizedKVCache)) or c.keys is None or _allocated(c) == c.offset:
        return c
    new = type(c).__new__(type(c))
    new.__dict__.update(c.__dict__)
    new.keys, new.values = tree_map(lambda x: x[..., : c.offset, :], (c.keys, c.values))
    return new


def _checksum(cache: list, metadata: dict[str, str]) -> str:
    """sha256 of the metadata entries and of every layer's class and state, arrays by bytes.

    Computed on the cache objects, not the file, so it is the same before ``save`` and after
    ``load`` (mlx-lm turns ints into 0-d arrays and back in between)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(metadata.items())).encode())
    for layer in cache:
        h.update(type(layer).__name__.encode())
        for name, leaf in tree_flatten(layer.state):
            h.update(name.encode())
            if isinstance(leaf, mx.array):
                h.update(f"{leaf.dtype}{leaf.shape}".encode())
                view = memoryview(leaf)
                h.update(view if view.c_contiguous else memoryview(mx.contiguous(leaf)))
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()
