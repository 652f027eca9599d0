"""Middlewares: errors become TGI's responses, and the API key is checked.

Errors: an `InferError` raised by a handler is answered as TGI does: JSON
`{"error", "error_type"}` with its status, or text/plain for the body rejections axum answers
before a handler runs (`BodyError`).

API key: with --api-key every inference and tokenization route needs `Authorization: Bearer
<key>`, compared exactly and in constant time; health, info, metrics and docs stay open (GET).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from router.errors import BodyError, InferError
from router.http.jsonio import json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_ROUTES = {
    "/",
    "/health",
    "/ping",
    "/info",
    "/metrics",
    "/v1/models",
    "/docs",
    "/api-doc/openapi.json",
}  # GET only
OPEN_PREFIXES = ("/docs/static/",)  # Swagger UI's files, GET only


def error_response(err: InferError) -> web.Response:
    if isinstance(err, BodyError):
        return web.Response(status=err.status, text=str(err), content_type="text/plain")
    return json_response(err.to_json(), status=err.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InferError as err:
        return error_response(err)


def auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_open = request.path in OPEN_ROUTES or request.path.startswith(OPEN_PREFIXES)
        if request.method != "GET" or not is_open:
            # aiohttp decodes header bytes that are not UTF-8 as surrogates: give them back
            # as they came, so a malformed header is a wrong key (401), not a crash (500).
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if request.method != "OPTIONS" and not hmac.compare_digest(given, expected):
                return web.Response(status=401)
        return await handler(request)

    return check
