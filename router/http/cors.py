"""CORS as TGI sets it up (tower-http `CorsLayer` in `server.rs`): methods GET and POST, the
`content-type` header (and `authorization`, so a browser can send the API key), and the
origins of `--cors-allow-origin`, or any origin (`*`) when none is configured.

As tower-http does:
  * every OPTIONS request, on any path, is a preflight: answered 200 with an empty body and
    the allow-methods / allow-headers headers, without reaching the handler or the API key
    check;
  * every response (preflight, success, error, 404, SSE stream) gets
    `access-control-allow-origin` (`*`, or the request's Origin when it is in the list; none
    otherwise) and `vary: origin, access-control-request-method, access-control-request-headers`.

The response headers are added in `on_response_prepare`, not in the middleware, because a
streamed response has sent its headers before the handler returns. `setup_cors(app, origins)`
installs both pieces; the middleware goes first, so a preflight never meets the auth check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

ALLOW_METHODS = "GET,POST"
ALLOW_HEADERS = "content-type,authorization"
VARY = "origin, access-control-request-method, access-control-request-headers"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_origin(origins: tuple[str, ...], origin: str | None) -> str | None:
    """The access-control-allow-origin value: `*` without a list, else the request's own
    Origin when the list has it (exact match), else None."""
    if not origins:
        return "*"
    return origin if origin in origins else None


def cors_middleware(origins: tuple[str, ...]):
    """Answers preflights (any OPTIONS request); other requests go on unchanged."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS":
            return await handler(request)
        return web.Response(
            status=200,
            headers={
                "access-control-allow-methods": ALLOW_METHODS,
                "access-control-allow-headers": ALLOW_HEADERS,
            },
        )

    return preflight


def cors_headers(origins: tuple[str, ...]):
    """An `on_response_prepare` handler that adds the origin and vary headers."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        allow = allowed_origin(origins, request.headers.get("Origin"))
        if allow is not None:
            response.headers["access-control-allow-origin"] = allow
        response.headers.add("vary", VARY)

    return add_headers


def setup_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Installs CORS on an app that has not started yet: the preflight middleware outermost,
    and the response headers."""
    app.middlewares.insert(0, cors_middleware(origins))
    app.on_response_prepare.append(cors_headers(origins))
