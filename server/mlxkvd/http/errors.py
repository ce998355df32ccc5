"""The HTTP APIs' errors: one table from the daemon's typed errors (and the gateway's own) to an
HTTP status and each API's error shape.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``. Anthropic: ``{"type": "error",
"error": {"type", "message"}}``. The SDKs pick their exception class from the status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from ..errors import (
    ContextOverflowError,
    ConversationBusyError,
    ConversationNotFoundError,
    InvalidRequestError,
    MlxkvError,
    ModelLoadError,
    ModelNotFoundError,
    ShuttingDownError,
    StaleRevisionError,
    TurnCancelledError,
)

OPENAI = "openai"
ANTHROPIC = "anthropic"


@dataclass(frozen=True)
class Kind:
    """One row of the table: the status and each API's name for the error."""

    status: int
    openai_type: str
    openai_code: str | None
    anthropic_type: str
    anthropic_status: int | None = None  # where Anthropic's convention has another status


INVALID = Kind(400, "invalid_request_error", None, "invalid_request_error")
CONTEXT_OVERFLOW = Kind(400, "invalid_request_error", "context_length_exceeded", "invalid_request_error")
UNAUTHORIZED = Kind(401, "invalid_request_error", "invalid_api_key", "authentication_error")
NOT_FOUND = Kind(404, "invalid_request_error", "not_found", "not_found_error")
MODEL_NOT_FOUND = Kind(404, "invalid_request_error", "model_not_found", "not_found_error")
METHOD_NOT_ALLOWED = Kind(405, "invalid_request_error", "method_not_allowed", "invalid_request_error")
CONFLICT = Kind(409, "invalid_request_error", "conflict", "invalid_request_error")
TOO_LARGE = Kind(413, "invalid_request_error", "request_too_large", "request_too_large")
INTERNAL = Kind(500, "server_error", "internal_error", "api_error")
# Anthropic says "overloaded" with 529; its clients retry it, as OpenAI's retry a 503.
UNAVAILABLE = Kind(503, "server_error", "service_unavailable", "overloaded_error", 529)

DOMAIN: dict[type[MlxkvError], Kind] = {
    InvalidRequestError: INVALID,
    ContextOverflowError: CONTEXT_OVERFLOW,
    # The conversation was deleted while its turn ran.
    ConversationNotFoundError: NOT_FOUND,
    # Not raised for stateless turns (a busy conversation is branched), kept for completeness.
    ConversationBusyError: CONFLICT,
    StaleRevisionError: CONFLICT,
    ModelLoadError: INTERNAL,
    ModelNotFoundError: MODEL_NOT_FOUND,
    ShuttingDownError: UNAVAILABLE,
    # A turn the daemon cancelled (shutdown past its grace); a client that left sees nothing.
    TurnCancelledError: UNAVAILABLE,
}


class HttpError(Exception):
    """An error of the gateway itself: no API key, unknown model or route, body too large."""

    def __init__(self, kind: Kind, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param


def classify(error: BaseException) -> tuple[Kind, str, str | None]:
    """The row, message and parameter name (if any) for an error; anything unexpected is
    INTERNAL, with its type in the message."""
    if isinstance(error, HttpError):
        return error.kind, str(error), error.param
    for cls in type(error).__mro__:
        if cls in DOMAIN:
            return DOMAIN[cls], str(error), None
    return INTERNAL, f"internal error: {type(error).__name__}: {error}", None


def error_body(api: str, error: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of an error in ``api``'s shape."""
    kind, message, param = classify(error)
    if api == ANTHROPIC:
        body = {"type": "error", "error": {"type": kind.anthropic_type, "message": message}}
        return kind.anthropic_status or kind.status, body
    return kind.status, {
        "error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.openai_code}
    }


def error_response(api: str, error: BaseException) -> JSONResponse:
    status, body = error_body(api, error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)
