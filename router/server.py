"""TGI's HTTP routes on aiohttp: /generate, /generate_stream, / (compat), /health, /info,
/tokenize. Handlers only translate HTTP <-> router objects; the work is in Validation, Infer
and the Batcher."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from router.config import RouterConfig
from router.cors import setup_cors
from router.entry import EndEvent, ErrorEvent, PrefillEvent
from router.errors import BodyError, GenerationError, InferError, ValidationError
from router.health import Health
from router.infer import Infer
from router.json_body import loads_strict
from router.metrics import Metrics
from router.openai import add_openai_routes
from router.openapi import add_docs_routes
from router.protocol import generate_response, stream_event, timing_headers
from router.streaming import open_stream, sse_data, with_keep_alive
from router.tokenizer import Tokenizer
from router.validation import Validation, parse_compat_generate_request, parse_generate_request

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass
class AppState:
    config: RouterConfig
    validation: Validation
    infer: Infer
    tokenizer: Tokenizer
    health: Health
    metrics: Metrics


def error_response(err: InferError) -> web.Response:
    if isinstance(err, BodyError):
        return web.Response(status=err.status, text=str(err), content_type="text/plain")
    return web.json_response(err.to_json(), status=err.status)


async def read_json(request: web.Request):
    if request.content_type != "application/json":
        raise BodyError.missing_json_content_type()
    return loads_strict(await request.read())


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except InferError as err:
        return error_response(err)


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


def auth_middleware(api_key: str):
    """With --api-key, every inference and tokenization route needs `Authorization: Bearer
    <key>`, compared exactly and in constant time; health, info and metrics stay open."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.method != "GET" or request.path not in OPEN_ROUTES:
            given = request.headers.get("Authorization", "").encode()
            if request.method != "OPTIONS" and not hmac.compare_digest(given, expected):
                return web.Response(status=401)
        return await handler(request)

    return check


STATE = web.AppKey("state", AppState)


def state(request: web.Request) -> AppState:
    return request.app[STATE]


async def generate(request: web.Request) -> web.Response:
    body = await read_json(request)
    return await _generate(request, parse_generate_request(body), compat=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return await _generate_stream(request, parse_generate_request(body), compat=False)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """TGI's `POST /`: a list for non-stream answers (as the Inference API), SSE when stream.
    `return_full_text` defaults to true here, as TGI does for text-generation models."""
    parsed, stream = parse_compat_generate_request(await read_json(request))
    if stream:
        return await _generate_stream(request, parsed, compat=True)
    return await _generate(request, parsed, compat=True)


async def _generate(request: web.Request, parsed, compat: bool) -> web.Response:
    s = state(request)
    received = time.monotonic()
    s.metrics.request_started()
    with s.metrics.counting_failures():  # tgi_request_failure{err} for any InferError
        s.validation.precheck(parsed)  # TGI checks best_of before taking any permit
        permit = s.infer.acquire()
        try:
            validated = await s.validation.validate(parsed, default_return_full_text=compat)
            validated_at = time.monotonic()
            s.metrics.request_validated(
                validated.input_length, validated.stopping.max_total_new_tokens
            )
            others = None  # the other best_of sequences
            if validated.best_of > 1:
                result, others = await s.infer.generate_best_of(validated, validated.best_of)
            else:
                result = await s.infer.generate(validated)
        except GenerationError:
            s.health.request_failed()
            raise
        finally:
            permit.release()
    finished = time.monotonic()
    s.metrics.request_succeeded(result.end, received, validated_at, finished)
    body = generate_response(validated, result, others)
    headers = timing_headers(validated, result.end, received, validated_at, finished)
    return web.json_response([body] if compat else body, headers=headers)


async def _generate_stream(request: web.Request, parsed, compat: bool) -> web.StreamResponse:
    s = state(request)
    received = time.monotonic()
    s.metrics.request_started()
    with s.metrics.counting_failures():
        s.validation.precheck(parsed, stream=True)  # these errors get an HTTP status, as in TGI
    response = await open_stream(request)
    try:
        permit = s.infer.acquire()
    except InferError as err:  # overload arrives inside the stream, as in TGI
        s.metrics.request_failed(err)
        await response.write(sse_data(err.to_json()))
        return response
    try:
        await _stream_events(s, response, parsed, compat, received)
    finally:
        permit.release()
    return response


async def _stream_events(
    s: AppState,
    response: web.StreamResponse,
    parsed,
    compat: bool,
    received: float | None = None,
) -> None:
    received = time.monotonic() if received is None else received
    try:
        validated = await s.validation.validate(
            parsed, stream=True, default_return_full_text=compat
        )
    except InferError as err:
        s.metrics.request_failed(err)
        await response.write(sse_data(err.to_json()))
        return
    validated_at = time.monotonic()
    s.metrics.request_validated(validated.input_length, validated.stopping.max_total_new_tokens)
    events = s.infer.generate_stream(validated)
    index = 0
    try:
        async for event in with_keep_alive(events, response):
            if isinstance(event, PrefillEvent):
                continue
            if isinstance(event, ErrorEvent):
                s.health.request_failed()
                s.metrics.request_failed(event.error)
                await response.write(sse_data(event.error.to_json()))
                return
            index += 1
            end = event if isinstance(event, EndEvent) else None
            if end is not None:
                s.metrics.request_succeeded(end, received, validated_at, time.monotonic())
            await response.write(
                sse_data(stream_event(index, validated, event.token, event.top_tokens, end))
            )
    finally:
        await events.aclose()


async def health(request: web.Request) -> web.Response:
    if await state(request).health.check():
        return web.Response(status=200)
    return web.json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)


async def info(request: web.Request) -> web.Response:
    c = state(request).config
    return web.json_response(
        {
            "model_id": c.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_best_of": c.max_best_of,
            "max_stop_sequences": c.max_stop_sequences,
            "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens,
            "validation_workers": c.validation_workers,
            "max_client_batch_size": c.max_client_batch_size,
            "router": "text-generation-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    body = state(request).metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def tokenize(request: web.Request) -> web.Response:
    s = state(request)
    parsed = parse_generate_request(await read_json(request))
    if not parsed.inputs:
        raise ValidationError("`inputs` cannot be empty")
    pieces = s.tokenizer.encode_with_offsets(parsed.inputs, add_special_tokens=True)
    return web.json_response(
        [{"id": i, "text": parsed.inputs[a:b], "start": a, "stop": b} for i, (a, b) in pieces]
    )


def make_app(app_state: AppState) -> web.Application:
    middlewares = [errors_middleware]
    if app_state.config.api_key:
        middlewares.insert(0, auth_middleware(app_state.config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=app_state.config.payload_limit)
    setup_cors(app, app_state.config.cors_allow_origin)
    app[STATE] = app_state
    app.router.add_post("/", compat_generate)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/tokenize", tokenize)
    for path in ("/", "/health", "/ping"):
        app.router.add_get(path, health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    add_docs_routes(app, VERSION)
    add_openai_routes(app)
    return app
