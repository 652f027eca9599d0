"""CORS as TGI's tower-http layer answers it: preflights on every path without the API key,
allow-origin on every response (streams and errors too), `*` unless origins are configured."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.http.cors import VARY, setup_cors
from router.http.middleware import auth_middleware, errors_middleware
from router.http.sse import EventStream, sse_data

ACAO = "access-control-allow-origin"


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def stream(request: web.Request) -> web.StreamResponse:
    stream = await EventStream.open(request, write_timeout=5.0, compute_type="cpu")
    response = stream.response
    await response.write(sse_data({"token": 1}))
    return response


def make_app(origins: tuple[str, ...], api_key: str | None = None) -> web.Application:
    middlewares = [errors_middleware]
    if api_key:
        middlewares.insert(0, auth_middleware(api_key))
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/info", ok)
    app.router.add_post("/generate", ok)
    app.router.add_post("/generate_stream", stream)
    setup_cors(app, origins)
    return app


def run(origins, check, api_key=None):
    async def main():
        async with TestClient(TestServer(make_app(origins, api_key))) as client:
            await check(client)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_preflight_on_every_path_needs_no_api_key():
    async def check(client):
        for path in ("/generate", "/generate_stream", "/info", "/nowhere"):
            response = await client.options(
                path,
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert response.status == 200, path
            assert await response.read() == b""
            assert response.headers[ACAO] == "*"
            assert response.headers["access-control-allow-methods"] == "GET,POST"
            allowed = response.headers["access-control-allow-headers"].split(",")
            assert "content-type" in allowed and "authorization" in allowed
            assert response.headers.getall("vary") == [VARY]

    run((), check, api_key="secret")


def test_any_origin_on_every_response_when_none_is_configured():
    async def check(client):
        origin = {"Origin": "https://app.example"}
        authorized = {**origin, "Authorization": "Bearer secret"}
        response = await client.post("/generate", json={}, headers=authorized)
        assert response.status == 200 and response.headers[ACAO] == "*"
        response = await client.get("/info")  # no Origin header: still `*`, as tower-http
        assert response.headers[ACAO] == "*"
        response = await client.post("/generate_stream", json={}, headers=authorized)
        assert response.headers[ACAO] == "*"  # headers of a streamed response
        assert "data:" in await response.text()
        response = await client.post("/generate", json={}, headers=origin)  # no API key
        assert response.status == 401 and response.headers[ACAO] == "*"
        assert "access-control-allow-methods" not in response.headers  # preflight only

    run((), check, api_key="secret")


def test_configured_origins_are_echoed_and_others_get_no_header():
    origins = ("https://a.example", "https://b.example")

    async def check(client):
        for origin in origins:
            response = await client.post("/generate", json={}, headers={"Origin": origin})
            assert response.headers[ACAO] == origin
            assert response.headers.getall("vary") == [VARY]
        response = await client.post("/generate", json={}, headers={"Origin": "https://evil"})
        assert response.status == 200 and ACAO not in response.headers
        response = await client.get("/info")
        assert ACAO not in response.headers
        response = await client.get("/nowhere", headers={"Origin": origins[0]})
        assert response.status == 404 and response.headers[ACAO] == origins[0]
        response = await client.options("/generate", headers={"Origin": "https://evil"})
        assert response.status == 200 and ACAO not in response.headers
        response = await client.options("/generate", headers={"Origin": origins[1]})
        assert response.headers[ACAO] == origins[1]

    run(origins, check)
