"""TGI's own routes: /generate, /generate_stream, / (compat), /tokenize, /health, /info and
/metrics. Handlers only translate HTTP <-> router objects; generating requests go through the
one path in `generation.py`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from functools import partial
from typing import Any

from aiohttp import web

from router import VERSION
from router.batching.events import EndEvent, ErrorEvent, Event, PrefillEvent
from router.errors import ValidationError
from router.http.generation import GenerationStream, Options, generate
from router.http.jsonio import json_response, read_json
from router.http.responses import generate_response, stream_event, timing_headers
from router.http.sse import EventStream, sse_data
from router.http.state import AppState, app_state
from router.validation.generate_request import (
    GenerateRequest,
    parse_compat_generate_request,
    parse_generate_request,
)

NATIVE = Options()
COMPAT = Options(default_return_full_text=True)


async def generate_route(request: web.Request) -> web.Response:
    body = await read_json(request)
    return await answer(app_state(request), parse_generate_request(body), NATIVE)


async def generate_stream_route(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return await stream(request, parse_generate_request(body), NATIVE)


async def compat_generate_route(request: web.Request) -> web.StreamResponse:
    """TGI's `POST /`: a list for non-stream answers (as the Inference API), SSE when stream.
    `return_full_text` defaults to true here, as TGI does for text-generation models."""
    return await compat_generate(request, await read_json(request))


async def compat_generate(request: web.Request, body: Any) -> web.StreamResponse:
    parsed, streamed = parse_compat_generate_request(body)
    if streamed:
        return await stream(request, parsed, COMPAT)
    return await answer(app_state(request), parsed, COMPAT, as_list=True)


async def answer(
    state: AppState, parsed: GenerateRequest, options: Options, as_list: bool = False
) -> web.Response:
    done = await generate(state, parsed, options)
    body = generate_response(done.request, done.result, done.others)
    headers = timing_headers(done.request, done.result.end, done.timings, state.config.compute_type)
    return json_response([body] if as_list else body, headers=headers)


async def stream(
    request: web.Request, parsed: GenerateRequest, options: Options
) -> web.StreamResponse:
    state = app_state(request)
    generation = GenerationStream(state, parsed, options)  # precheck errors: HTTP status
    sse = await EventStream.open(
        request, state.config.stream_write_timeout, state.config.compute_type
    )
    index = 0

    def render(event: Event) -> Iterable[bytes]:
        nonlocal index
        if isinstance(event, PrefillEvent):
            return ()
        if isinstance(event, ErrorEvent):
            return (sse_data(event.error.to_json()),)
        index += 1
        end = event if isinstance(event, EndEvent) else None
        validated = generation.validated
        return (sse_data(stream_event(index, validated, event.token, event.top_tokens, end)),)

    await sse.send(generation.events(), render)
    return sse.response


async def tokenize(request: web.Request) -> web.Response:
    """Token ids and character offsets of `inputs`, under a permit like any other request."""
    state = app_state(request)
    parsed = parse_generate_request(await read_json(request))
    if not parsed.inputs:
        raise ValidationError("`inputs` cannot be empty")
    return await tokenize_response(state, parsed.inputs, add_special_tokens=True)


async def tokenize_response(state: AppState, text: str, add_special_tokens: bool) -> web.Response:
    """The pieces of `text` as JSON, made entirely by a validation worker: for a prompt of
    megabytes the list alone is millions of objects, which must not be built in this process
    (it would stall the event loop)."""
    permit = state.infer.acquire()
    try:
        build = partial(state.tokenizer.pieces_json, text, add_special_tokens)
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(state.validation.executor, build)
    finally:
        permit.release()
    return web.Response(text=body, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    if await app_state(request).health.check():
        return web.Response(status=200)
    return json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)


async def info(request: web.Request) -> web.Response:
    c = app_state(request).config
    return json_response(
        {
            "model_id": c.model_id,
            "model_sha": None,
            "model_dtype": c.model_dtype,
            "model_device_type": c.model_device_type,
            "model_pipeline_tag": "text-generation",
            "quantize": c.quantize,  # not in TGI: none, eetq, int4, gguf, gptq or awq
            "batch_invariant": c.batch_invariant,  # not in TGI (README: what it covers)
            "model_implementation": c.model_implementation,  # not in TGI: native/transformers
            "kernels": c.kernels,  # not in TGI: how the CPU kernels were loaded
            "system_fingerprint": c.system_fingerprint,  # not in TGI: OpenAI's, as there
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
    body = app_state(request).metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def add_native_routes(app: web.Application) -> None:
    app.router.add_post("/", compat_generate_route)
    app.router.add_post("/generate", generate_route)
    app.router.add_post("/generate_stream", generate_stream_route)
    app.router.add_post("/tokenize", tokenize)
    for path in ("/", "/health", "/ping"):
        app.router.add_get(path, health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
