"""A pass's logits at one position, through the output head for that position alone.

A model's call puts every position of a pass through its output head (a hidden-size x
vocabulary product per position), and mlx-lm then keeps the last position's logits. A cached
turn's one pass on a GPU feeds a few hundred new tokens and needs one position's logits: the
head's work for the others is thrown away (on the CPU the runtime avoids it another way, see
``ModelRuntime.generate``).

``OnePosition`` runs the model's body (``model.model``, which ends in the final norm in
mlx-lm's models), keeps the one position's hidden state and applies the head to it: the
untied ``lm_head``, else the tied embeddings' ``as_linear``. Some models do more after the
body (a logit soft-cap, a scale); rather than knowing them, ``OnePosition`` checks once per
model, on a short input, that its logits agree with the model's own call (up to the rounding
of a head over one row rather than many), and where they do not, or the model lacks those
parts, it calls the model as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import mlx.core as mx

log = logging.getLogger(__name__)

# Largest difference allowed between the shortcut's logits and the model's own, relative to the
# largest logit: a head over one row and over several round differently, a soft-cap or a scale
# changes logits by far more.
_AGREEMENT = 1e-2
_PROBE = [[1, 2, 3, 4, 5, 6, 7, 8]]


class OnePosition:
    """``logits(inputs, cache, position)``: the logits at ``position`` of a pass of ``inputs``
    (shape (1, n)) onto ``cache``, shape (1, vocabulary), lazy."""

    def __init__(self, model: Any, make_cache: Callable[[], list], *, shortcut: bool = True):
        """``shortcut`` False: the model is called as it is, unchecked (where the caller's
        passes that need logits feed one token, the check would cost a start-up pass for
        nothing)."""
        self._model = model
        self._parts = _parts(model) if shortcut else None
        if self._parts is not None:
            why = self._disagreement(make_cache)
            if why:
                log.info("logits of every position are computed, the model's head alone is not exact: %s", why)
                self._parts = None

    @property
    def shortcut(self) -> bool:
        """Whether the head runs for the one position only."""
        return self._parts is not None

    def logits(self, inputs: mx.array, cache: list, position: int = -1) -> mx.array:
        if self._parts is None:
            return self._model(inputs, cache=cache)[:, position, :]
        body, head = self._parts
        return head(body(inputs, cache=cache)[:, position, :])

    def _disagreement(self, make_cache: Callable[[], list]) -> str:
        """Why the shortcut's logits differ from the model's own on a short input ("": they agree)."""
        inputs = mx.array(_PROBE, dtype=mx.uint32)
        try:
            body, head = self._parts
            fast = head(body(inputs, cache=make_cache())[:, -1, :]).astype(mx.float32)
            full = self._model(inputs, cache=make_cache())[:, -1, :].astype(mx.float32)
            mx.eval(fast, full)
        except Exception as exc:  # noqa: BLE001 - any failure means: call the model as it is
            return f"{type(exc).__name__}: {exc}"
        if fast.shape != full.shape:
            return f"shape {fast.shape} against {full.shape}"
        scale = max(float(mx.max(mx.abs(full)).item()), 1e-6)
        diff = float(mx.max(mx.abs(fast - full)).item())
        return "" if diff <= _AGREEMENT * scale else f"logits differ by {diff:.3g} (largest {scale:.3g})"


def _parts(model: Any) -> tuple[Callable, Callable] | None:
    """The model's body and its head, where it has mlx-lm's usual layout; else None."""
    body = getattr(model, "model", None)
    embed = getattr(body, "embed_tokens", None)
    if body is None or embed is None:
        return None
    if "lm_head" in model:  # mlx-lm's models hold an lm_head only when it is not tied
        return body, model["lm_head"]
    if hasattr(embed, "as_linear"):
        return body, embed.as_linear
    return None
