"""A turn's parameters, checked the same way whichever adapter (gRPC, HTTP) received them.

Each function takes plain values and returns the checked value, or raises
``InvalidRequestError`` saying which parameter is wrong and why.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import InvalidRequestError
from .runtime import Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def sampling(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampling:
    """Checked sampling parameters (a temperature below 1e-5 is greedy, see ``runtime``)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0, got {top_k}")
    if not (0.0 <= min_p < 1.0):
        raise InvalidRequestError(f"min_p must be in [0, 1), got {min_p}")
    return Sampling(temperature, top_p, top_k, min_p, seed)


def stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """Checked stop strings: at most ``MAX_STOP_STRINGS``, each 1 to ``MAX_STOP_STRING_CHARS``
    characters."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings")
    for s in stop:
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters")
    return tuple(stop)


def max_tokens(n: int, context_length: int) -> int:
    """A checked ``max_tokens``: at least 1, at most the model's context window."""
    if not (1 <= n <= context_length):
        raise InvalidRequestError(f"max_tokens must be in [1, {context_length}], got {n}")
    return n
