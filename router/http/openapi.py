"""The OpenAPI 3.1 document of the HTTP API, and the routes that serve it (`/api-doc/openapi.json`,
`/docs`).

The document describes the responses exactly as this server sends them, because it is also used
to validate real responses and to fuzz the server: which keys are always present, which are
omitted when empty, which are `null`, which statuses a route can answer and in which content type
(TGI's own `docs/openapi.json` is looser: it misses the text/plain body rejections, nulls and the
in-band stream errors). Schema names follow TGI's (`GenerateRequest`, `Details`, `StreamResponse`,
...). TGI's native response objects are closed (`additionalProperties: false`); the OpenAI ones
are open, as OpenAI adds fields and its clients ignore unknown keys. Request schemas are open:
unknown keys are ignored, and explicit `null` is accepted for every optional field.

Server-sent events: the `text/event-stream` schema is the schema of the JSON in each `data:` line
(as TGI documents it). `x-sse-terminator` names a final non-JSON `data:` line (`[DONE]` on the
OpenAI routes); without it the stream just ends.
"""

from __future__ import annotations

import json

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from router import VERSION
from router.http.openapi_openai_schemas import openai_schemas
from router.http.openapi_schemas import Schema, native_schemas, ref, string
from router.http.responses import INTEGER_TIMING_HEADERS

TAG = "Text Generation Inference"

# ------------------------------------------------------------------------------------------------
# Responses and operations


def json_body(schema: Schema) -> dict:
    return {"application/json": {"schema": schema}}


def sse_body(event: Schema, terminator: str | None = None) -> dict:
    media: dict = {"schema": event}
    if terminator:
        media["x-sse-terminator"] = terminator
    return {"text/event-stream": media}


def text_body() -> dict:
    return {"text/plain": {"schema": string()}}


def header(required: bool, schema: Schema, description: str) -> dict:
    return {"required": required, "schema": schema, "description": description}


SECONDS = string(pattern=r"^[0-9]+(\.[0-9]+)?$")
INTEGER_TEXT = string(pattern=r"^[0-9]+$")


def timing_headers(required: bool) -> dict:
    """The x-* headers of a non-streamed generation (times in ms unless said otherwise)."""
    headers = {name: header(required, INTEGER_TEXT, name[2:]) for name in INTEGER_TIMING_HEADERS}
    headers["x-compute-time"] = header(required, SECONDS, "Seconds.")
    headers["x-compute-type"] = header(True, string(), "Hardware label.")
    return headers


def sse_headers() -> dict:
    return {
        "Cache-Control": header(True, {"const": "no-cache"}, "Never cached."),
        "X-Accel-Buffering": header(True, {"const": "no"}, "No proxy buffering."),
        "x-compute-type": header(True, string(), "Hardware label."),
    }


def response(description: str, content: dict | None = None, headers: dict | None = None) -> dict:
    out: dict = {"description": description}
    if content:
        out["content"] = content
    if headers:
        out["headers"] = headers
    return out


def error(description: str) -> dict:
    return response(description, json_body(ref("ErrorResponse")))


def body_rejections(json_errors: bool = True) -> dict[str, dict]:
    """What can happen before a POST handler runs, plus the JSON errors of inference routes."""
    out = {
        "400": response("The body is not valid JSON (text/plain).", text_body()),
        "401": response("Missing or wrong bearer token (only with --api-key); empty body."),
        "413": response("The body is larger than --payload-limit (text/plain).", text_body()),
        "415": response("Content-Type is not application/json (text/plain).", text_body()),
        "422": response(
            "Validation error (JSON), or a body of the wrong shape (text/plain).",
            {**json_body(ref("ErrorResponse")), **text_body()},
        ),
    }
    if json_errors:
        out["424"] = error("The shard failed during generation.")
        out["429"] = error("Model is overloaded (max_concurrent_requests).")
        out["500"] = error("Incomplete generation.")
    return out


def operation(op_id: str, summary: str, responses: dict, body: str | None = None) -> dict:
    op: dict = {"tags": [TAG], "summary": summary, "operationId": op_id, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": json_body(ref(body))}
        op["security"] = [{}, {"bearerAuth": []}]
    return op


def sse_headers_optional() -> dict:
    return {name: {**spec, "required": False} for name, spec in sse_headers().items()}


def generate_paths() -> dict:
    """/generate, /generate_stream and POST /. A stream answers 200 even for the errors met
    while generating (they arrive as events), so it has no 424/429/500."""
    generate_ok = response(
        "The generation.", json_body(ref("GenerateResponse")), timing_headers(True)
    )
    stream_ok = response(
        "One event per token; the last one has generated_text (and details). Errors met while "
        "generating arrive as an ErrorResponse event, then the stream ends. No [DONE].",
        sse_body(ref("StreamEvent")),
        sse_headers(),
    )
    compat_ok = response(
        "A one-item list (stream false) or the events of /generate_stream (stream true).",
        {**json_body(ref("CompatGenerateResponse")), **sse_body(ref("StreamEvent"))},
        {**sse_headers_optional(), **timing_headers(False)},
    )
    return {
        "/": {
            "post": operation(
                "compat_generate",
                "Generate; a stream when `stream` is true",
                {"200": compat_ok, **body_rejections()},
                "CompatGenerateRequest",
            ),
        },
        "/generate": {
            "post": operation(
                "generate",
                "Generate tokens",
                {"200": generate_ok, **body_rejections()},
                "GenerateRequest",
            )
        },
        "/generate_stream": {
            "post": operation(
                "generate_stream",
                "Generate a stream of tokens (server-sent events)",
                {"200": stream_ok, **body_rejections(json_errors=False)},
                "GenerateRequest",
            )
        },
    }


def info_paths() -> dict:
    """/tokenize, the health checks, /info and /metrics."""
    health = {
        "200": response("Healthy; empty body."),
        "503": error("The shards do not answer; error_type `healthcheck`."),
    }
    tokens = response("The tokens.", json_body(ref("TokenizeResponse")))
    return {
        "/": {"get": operation("root_health", "Health check (same as /health)", health)},
        "/tokenize": {
            "post": operation(
                "tokenize",
                "Tokenize inputs",
                {"200": tokens, **body_rejections(json_errors=False)},
                "TokenizeRequest",
            )
        },
        "/health": {"get": operation("health", "Health check", health)},
        "/ping": {"get": operation("ping", "Health check (same as /health)", health)},
        "/info": {
            "get": operation(
                "get_model_info",
                "Model and router info",
                {"200": response("Info.", json_body(ref("Info")))},
            )
        },
        "/metrics": {
            "get": operation(
                "metrics",
                "Prometheus metrics",
                {"200": response("Prometheus text format 0.0.4.", text_body())},
            )
        },
    }


def openai_paths() -> dict:
    chat_ok = response(
        "A chat.completion, or chat.completion.chunk events (stream true) ending with "
        "`data: [DONE]`; errors while streaming arrive as an OpenAIStreamError event.",
        {
            **json_body(ref("ChatCompletion")),
            **sse_body(ref("ChatStreamEvent"), "[DONE]"),
        },
    )
    completion_ok = response(
        "A text_completion, or text_completion events (stream true) ending with `data: [DONE]`.",
        {
            **json_body(ref("Completion")),
            **sse_body(ref("CompletionStreamEvent"), "[DONE]"),
        },
    )
    tokenize_ok = response(
        "The templated text and its tokens.", json_body(ref("ChatTokenizeResponse"))
    )
    return {
        "/v1/chat/completions": {
            "post": operation(
                "chat_completions",
                "OpenAI chat completions",
                {"200": chat_ok, **body_rejections()},
                "ChatRequest",
            )
        },
        "/v1/completions": {
            "post": operation(
                "completions",
                "OpenAI (legacy) completions",
                {"200": completion_ok, **body_rejections()},
                "CompletionRequest",
            )
        },
        "/v1/models": {
            "get": operation(
                "openai_get_model_info",
                "The served model, as an OpenAI model list",
                {"200": response("The model list.", json_body(ref("ModelsList")))},
            )
        },
        "/chat_tokenize": {
            "post": operation(
                "get_chat_tokenize",
                "Apply the chat template and tokenize",
                {"200": tokenize_ok, **body_rejections(json_errors=False)},
                "ChatRequest",
            )
        },
    }


def sagemaker_paths() -> dict:
    """/invocations answers as the route its body belongs to."""
    return {
        "/invocations": {
            "post": operation(
                "sagemaker_compatibility",
                "SageMaker: `/` for a body with `inputs`, chat completions for one with "
                "`messages`, completions for one with `prompt`",
                {
                    "200": response(
                        "The answer of the route the body was sent to.",
                        {
                            "application/json": {
                                "schema": {
                                    "anyOf": [
                                        ref("CompatGenerateResponse"),
                                        ref("ChatCompletion"),
                                        ref("Completion"),
                                    ]
                                }
                            },
                            "text/event-stream": {
                                "schema": {
                                    "anyOf": [
                                        ref("StreamEvent"),
                                        ref("ChatStreamEvent"),
                                        ref("CompletionStreamEvent"),
                                    ]
                                },
                            },
                        },
                    ),
                    **body_rejections(),
                },
                "SagemakerRequest",
            )
        }
    }


def docs_paths() -> dict:
    return {
        "/api-doc/openapi.json": {
            "get": operation(
                "openapi",
                "This document",
                {"200": response("OpenAPI 3.1.", json_body({"type": "object"}))},
            )
        },
        "/docs": {
            "get": operation(
                "docs",
                "Swagger UI",
                {"200": response("An HTML page.", {"text/html": {"schema": string()}})},
            )
        },
    }


def paths() -> dict:
    """Every route; `/` has both GET (health) and POST (compat generate)."""
    out: dict = {}
    for group in (generate_paths(), info_paths(), openai_paths(), sagemaker_paths(), docs_paths()):
        for path, operations in group.items():
            out[path] = {**out.get(path, {}), **operations}
    return out


def openapi_document(version: str) -> dict:
    """The whole OpenAPI 3.1 document, as a JSON-serializable dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Text Generation Inference",
            "description": "TGI-compatible text generation server.",
            "license": {"name": "Apache 2.0", "identifier": "Apache-2.0"},
            "version": version,
        },
        "tags": [{"name": TAG}],
        "paths": paths(),
        "components": {
            "schemas": {
                **native_schemas(),
                **openai_schemas(),
                "SagemakerRequest": {
                    "anyOf": [
                        ref("CompatGenerateRequest"),
                        ref("ChatRequest"),
                        ref("CompletionRequest"),
                    ]
                },
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


# ------------------------------------------------------------------------------------------------
# Routes

# Swagger UI's files come from the swagger-ui-bundle package and are served under /docs/static/,
# so /docs works where neither the server nor the browser reaches the internet. The paths are
# relative, as the document's, so the page also works behind a proxy that adds a prefix.
SWAGGER_UI = "docs/static"
DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Text Generation Inference API</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui">
<p>Loading Swagger UI; the <a href="api-doc/openapi.json">OpenAPI document</a> itself.</p>
</div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"></script>
<script>
if (window.SwaggerUIBundle) {{
  SwaggerUIBundle({{url: "api-doc/openapi.json", dom_id: "#swagger-ui"}});
}}
</script>
</body>
</html>
"""


def add_docs_routes(app: web.Application, version: str = VERSION) -> None:
    """Registers GET /api-doc/openapi.json, GET /docs and Swagger UI's files (the document is
    built once)."""
    document = json.dumps(openapi_document(version))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(text=document, content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=DOCS_HTML, content_type="text/html")

    app.router.add_get("/api-doc/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_static(f"/{SWAGGER_UI}/", swagger_ui_path)
