"""The gateway's Starlette app: the API key in front of every route but ``GET /health``, the
routes of both APIs, and every error in the shape of the API that was called.

Which API a request speaks: Anthropic's for ``/v1/messages...`` and for any request with an
``anthropic-version`` header (its SDK always sends one: ``GET /v1/models`` answers in its shape
then), else OpenAI's.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import MlxkvError
from .anthropic_api import AnthropicApi
from .auth import authorized, presented_keys
from .errors import ANTHROPIC, METHOD_NOT_ALLOWED, NOT_FOUND, OPENAI, UNAUTHORIZED, HttpError, error_response
from .gateway import ClientGone, Gateway
from .openai_api import OpenAIApi
from .responses_api import ResponsesApi
from .warm_api import WarmApi

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the response


def api_of(scope: Scope) -> str:
    """OPENAI or ANTHROPIC: whose error shape the request gets."""
    if scope["path"].startswith("/v1/messages") or "anthropic-version" in Headers(scope=scope):
        return ANTHROPIC
    return OPENAI


def _is_health(scope: Scope) -> bool:
    return scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")


class RequireKey:
    """Answers 401, in the API's shape, to a request without the key (``GET /health`` is open)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _is_health(scope):
            headers = Headers(scope=scope)
            if not authorized(headers, self.key):
                message = ("invalid API key" if presented_keys(headers) else
                           "no API key: send Authorization: Bearer KEY or x-api-key: KEY "
                           "(`mlxkvd api-key` prints it)")
                await error_response(api_of(scope), HttpError(UNAUTHORIZED, message))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(gateway: Gateway, api_key: str) -> ASGIApp:
    """The ASGI app: both APIs over ``gateway``, behind ``api_key``."""
    openai, anthropic = OpenAIApi(gateway), AnthropicApi(gateway)

    def models_api(request: Request) -> Any:
        return anthropic if api_of(request.scope) == ANTHROPIC else openai

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": gateway.model_name})

    async def models(request: Request) -> Response:
        return JSONResponse(models_api(request).models())

    async def model(request: Request) -> Response:
        name = request.path_params["model_id"]
        gateway.check_model(name)
        entry = next((e for e in gateway.models() if name in (e.name, e.path.name)), None)
        if entry is None:  # a directory, not in the catalogue
            entry = gateway.turns.models.resolve(name) or gateway.turns.models.entry
        return JSONResponse(models_api(request).model_json(entry))

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientGone):
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(exc, HTTPException):  # Starlette's own: no such route, wrong method
            if exc.status_code == 404:
                exc = HttpError(NOT_FOUND, f"no route {request.url.path}")
            elif exc.status_code == 405:
                exc = HttpError(METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")
        # Anything else is also logged, with its traceback, by the server (uvicorn).
        return error_response(api_of(request.scope), exc)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            *openai.routes(),
            *ResponsesApi(gateway).routes(),
            *WarmApi(gateway).routes(),
            *anthropic.routes(),
        ],
        exception_handlers={cls: on_error for cls in (HttpError, MlxkvError, ClientGone, HTTPException, Exception)},
    )
    return RequireKey(app, api_key)
