"""The request's span, named as TGI names its handlers (`generate`, `generate_stream`,
`chat_completions`, ...), child of the client's `traceparent` when it sends one. It stays
current while the handler runs, streaming included, so `validate`, `queued` and `infer`
(router/batching/request_spans.py) are its children; `record_timings` adds TGI's fields."""

from __future__ import annotations

from aiohttp import web
from opentelemetry import trace

from common.tracing import extract, tracer
from router.batching.events import EndEvent
from router.http.middleware import Handler

SPAN_NAMES = {
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/": "compat_generate",
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/invocations": "sagemaker_compatibility",
    "/tokenize": "tokenize",
    "/chat_tokenize": "get_chat_tokenize",
}


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    name = SPAN_NAMES.get(request.path) if request.method == "POST" else None
    if name is None:
        return await handler(request)
    parent = extract(request.headers)
    with tracer().start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(trace.StatusCode.ERROR)
        return response


def record_timings(end: EndEvent, received: float, validated: float, finished: float) -> None:
    """TGI's fields on the request's span (seconds), where it is recorded."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    inference = max(finished - end.started_at, 0.0)
    span.set_attributes(
        {
            "total_time": finished - received,
            "validation_time": validated - received,
            "queue_time": max(end.started_at - end.queued_at, 0.0),
            "inference_time": inference,
            "time_per_token": inference / max(end.generated_tokens, 1),
            "generated_tokens": end.generated_tokens,
            **({"seed": end.seed} if end.seed is not None else {}),
        }
    )
