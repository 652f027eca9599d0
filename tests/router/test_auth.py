"""--api-key: inference and tokenization routes need the exact Bearer key; health stays open."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.http.middleware import auth_middleware


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def app() -> web.Application:
    application = web.Application(middlewares=[auth_middleware("s3cret")])
    for path in ("/", "/generate", "/tokenize"):
        application.router.add_post(path, ok)
    for path in ("/", "/health", "/info", "/metrics", "/docs/static/x.js", "/docs/staticky"):
        application.router.add_get(path, ok)
    application.router.add_post("/docs/static/x.js", ok)
    return application


def test_api_key_is_required_on_inference_routes():
    async def main():
        async with TestClient(TestServer(app())) as client:
            for path in ("/", "/generate", "/tokenize"):
                assert (await client.post(path)).status == 401
                for header in (
                    "Bearer wrong",
                    "bearer s3cret",
                    "Bearer S3CRET",
                    "s3cret",
                ):
                    assert (
                        await client.post(path, headers={"Authorization": header})
                    ).status == 401
                good = await client.post(path, headers={"Authorization": "Bearer s3cret"})
                assert good.status == 200
            for path in ("/", "/health", "/info", "/metrics", "/docs/static/x.js"):
                assert (await client.get(path)).status == 200
            assert (await client.get("/docs/staticky")).status == 401  # not Swagger UI's files
            assert (await client.post("/docs/static/x.js")).status == 401  # GET only

    asyncio.run(main())
