"""Typed domain errors, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class MlxkvError(Exception):
    """Base of every error the daemon reports to a client."""


class InvalidRequestError(MlxkvError):
    """The request is malformed: bad role, empty messages, out-of-range sampling values."""


class StaleRevisionError(MlxkvError):
    """A delta builds on a revision the daemon does not hold (or an unknown conversation).

    The client answers by re-sending the whole history with ``reset``.
    """


class ConversationNotFoundError(MlxkvError):
    """Get or delete of a conversation the daemon does not know."""


class ConversationBusyError(MlxkvError):
    """Another turn of the same conversation is in flight."""


class ContextOverflowError(MlxkvError):
    """The prompt plus max_tokens does not fit the model's context window."""


class ModelLoadError(MlxkvError):
    """The model directory is missing, incomplete or corrupt."""


class ModelNotFoundError(MlxkvError, LookupError):
    """A request names a model that is neither in the catalogue nor a directory."""


class BadModelError(InvalidRequestError):
    """A request names a directory that is not a model mlx-lm can load."""


class ModelChangedError(ModelLoadError):
    """The model's files changed on disk while it was unloaded; a restart serves the new ones."""


class ShuttingDownError(MlxkvError):
    """The daemon is stopping and takes no new work."""


class TurnCancelledError(MlxkvError):
    """The client went away or cancelled; the turn is not committed."""


STATUS_CODES: dict[type[MlxkvError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    StaleRevisionError: grpc.StatusCode.FAILED_PRECONDITION,
    ConversationNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ConversationBusyError: grpc.StatusCode.ABORTED,
    ContextOverflowError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Not FAILED_PRECONDITION: clients read that as "conversation lost" and resend the history.
    ModelLoadError: grpc.StatusCode.INTERNAL,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    TurnCancelledError: grpc.StatusCode.CANCELLED,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error; anything unexpected is INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL
