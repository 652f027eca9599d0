"""The shard's spans: one per gRPC call, named after the method as TGI's shard names them
(`/generate.v3.TextGenerationService/Prefill`), child of the span whose `traceparent` the
router sent in the call's metadata. Installed only when tracing is on (common/tracing.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import trace

from common.tracing import extract, tracer


class TracingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            traced(details, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def traced(details: grpc.HandlerCallDetails, behavior: Callable) -> Callable:
    """`behavior` (an async unary-unary method) inside a server span."""
    method = details.method  # "/generate.v3.TextGenerationService/Prefill"
    parent = extract({k: v for k, v in details.invocation_metadata or () if isinstance(v, str)})
    attributes = {"rpc.system": "grpc", "rpc.method": method.rsplit("/", 1)[-1]}

    async def call(request, context):
        with tracer().start_as_current_span(
            method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={**attributes, "net.transport": "unix"},
        ):
            return await behavior(request, context)

    return call
