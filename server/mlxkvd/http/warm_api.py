"""A warm-up over HTTP (``POST /v1/mlxkv/warm``): the socket's ``Warm`` for clients of the
OpenAI API.

The body is a Chat Completions request whose last message is the draft being typed (``model``,
``messages``, ``tools``, ``prompt_cache_key`` or ``user``); nothing is generated. The draft is
prefilled onto the session's conversation whose stored messages begin it (see ``sessions.py``),
or else onto an anonymous cache that the conversation the final request starts copies from;
the final request then prefills only what changed since the draft. The answer comes once the
draft is prefilled, or superseded by a newer warm-up or a turn of the same conversation::

    {"object": "mlxkv.warm", "prompt_tokens": 812, "cached_tokens": 640, "prefilled_tokens": 172,
     "superseded": false}
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import fields
from .gateway import Gateway
from .openai_api import messages, tools


class WarmApi:
    """The endpoint, over the shared ``Gateway``."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [Route("/v1/mlxkv/warm", self.warm, methods=["POST"])]

    async def warm(self, request: Request) -> Response:
        gw = self.gateway
        body = await gw.read_json(request)
        model = gw.check_model(fields.get(body, "model", str, required=True))
        session = fields.get(body, "prompt_cache_key", str) or fields.get(body, "user", str) or ""
        turns = gw.turns
        turn = await anyio.to_thread.run_sync(
            partial(turns.warm_stateless, "openai:" + session, messages(body), tools(body), model))

        async def outcome() -> Any:
            return await anyio.to_thread.run_sync(turns.wait_warm, turn, abandon_on_cancel=True)

        warmed = await gw.until_disconnected(request, turn, outcome)
        return JSONResponse({"object": "mlxkv.warm", "prompt_tokens": warmed.prompt_tokens,
                             "cached_tokens": warmed.cached_tokens, "prefilled_tokens": warmed.prefilled_tokens,
                             "superseded": warmed.superseded})
