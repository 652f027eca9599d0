"""The aiohttp application: middlewares and every route.

native.py              /generate  /generate_stream  /  /tokenize  /health  /info  /metrics
openai_chat.py         /v1/chat/completions  /chat_tokenize
openai_completions.py  /v1/completions
openai_common.py       /v1/models
sagemaker.py           /invocations
openapi.py             /api-doc/openapi.json  /docs
"""

from __future__ import annotations

from aiohttp import web

from router.http.cors import setup_cors
from router.http.middleware import auth_middleware, errors_middleware
from router.http.native import add_native_routes
from router.http.openai_chat import chat_completions, chat_tokenize
from router.http.openai_common import models
from router.http.openai_completions import completions
from router.http.openapi import add_docs_routes
from router.http.sagemaker import invocations
from router.http.state import STATE, AppState
from router.http.tracing import tracing_middleware


def make_app(app_state: AppState) -> web.Application:
    middlewares = [errors_middleware]
    if app_state.config.api_key:
        middlewares.insert(0, auth_middleware(app_state.config.api_key))
    middlewares.insert(0, tracing_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=app_state.config.payload_limit)
    setup_cors(app, app_state.config.cors_allow_origin)
    app[STATE] = app_state
    add_native_routes(app)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/chat_tokenize", chat_tokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/invocations", invocations)
    add_docs_routes(app)
    return app
