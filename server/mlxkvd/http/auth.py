"""The HTTP APIs' key: one secret in a file only its owner can read.

``load_key`` reads the file, or creates it with a new key on first use: mode 0600, in a
directory created 0700 if missing. A file the daemon did not create is never chmod-ed: if
others may read or write it, the daemon refuses to use it and says how to fix it.

Clients send the key as ``Authorization: Bearer KEY`` (OpenAI's SDK) or ``x-api-key: KEY``
(Anthropic's); ``authorized`` compares in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Mapping

KEY_BYTES = 32  # of randomness; token_urlsafe makes 43 characters of them


class ApiKeyError(Exception):
    """The key file cannot be read, created or trusted; the message says why."""


def load_key(path: Path) -> str:
    """The key in ``path``, created with a new random key if the file does not exist."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:  # another process made it first
        return _read(path)
    except OSError as exc:
        raise ApiKeyError(f"cannot create the API key file {path}: {exc.strerror or exc}") from None
    key = secrets.token_urlsafe(KEY_BYTES)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ApiKeyError(f"the API key file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise ApiKeyError(f"the API key file {path} belongs to another user (uid {st.st_uid})")
        if st.st_mode & 0o077:
            raise ApiKeyError(
                f"the API key file {path} can be read or written by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` if it is yours, or remove it "
                "to have a new key made"
            )
        key = fh.read().strip()
    if not key or any(c.isspace() for c in key):
        raise ApiKeyError(f"the API key file {path} must hold one key on one line")
    return key


def presented_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request presents: ``Authorization: Bearer KEY`` and ``x-api-key: KEY``."""
    keys = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    if headers.get("x-api-key"):
        keys.append(headers["x-api-key"].strip())
    return keys


def authorized(headers: Mapping[str, str], key: str) -> bool:
    """Whether the request presents ``key`` (compared in constant time)."""
    expected = key.encode()
    return any(hmac.compare_digest(k.encode(), expected) for k in presented_keys(headers))
