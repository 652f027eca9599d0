"""OpenTelemetry tracing, as TGI's `--otlp-endpoint`/`--otlp-service-name`: spans go to an OTLP
gRPC collector through a batch processor, W3C `traceparent` carries the context from the client
into the router and from the router into the shards (gRPC metadata).

Without an endpoint nothing is installed: the API's no-op tracer hands out non-recording spans,
which cost a microsecond or two. With one, export happens on the processor's own thread, so a
collector that is down or slow never blocks a request; its spans are dropped once the queue is
full. Shutdown flushes for at most `FLUSH_TIMEOUT` seconds and then lets the process exit.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

TRACER_NAME = "textgen"
FLUSH_TIMEOUT = 2.0  # seconds a stopping process waits for its last spans to leave
EXPORT_TIMEOUT = 5.0  # seconds one export may take before the exporter gives up on it


class Tracing:
    """The process's tracer provider, or nothing when tracing is off."""

    def __init__(self, provider=None):
        self.provider = provider

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flushes and stops the exporter, waiting at most `timeout` s (a collector that is
        down makes the exporter retry for longer: its thread is left behind, as a daemon)."""
        if self.provider is None:
            return
        stopper = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("traces not flushed within %.1f s: the collector may be down", timeout)


def setup_tracing(endpoint: str | None, service_name: str) -> Tracing:
    """Installs the global tracer provider exporting to `endpoint` (e.g. http://otel:4317);
    with no endpoint, leaves the no-op provider in place."""
    if not endpoint:
        return Tracing()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: service_name})
    # shutdown_on_exit=False: an atexit flush could wait on a dead collector; `Tracing.shutdown`
    # bounds that wait instead.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s as %s", endpoint, service_name)
    return Tracing(provider)


@functools.cache
def tracer() -> Tracer:
    """Our tracer, looked up once (it runs on every batch step). Before setup_tracing it is
    the API's proxy, which follows the provider installed later."""
    return trace.get_tracer(TRACER_NAME)


def grpc_metadata() -> Sequence[tuple[str, str]] | None:
    """The current span's context as gRPC metadata (`traceparent`), None when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


def extract(carrier: Mapping[str, str]) -> context.Context:
    """The context a `traceparent` header (or gRPC metadata) carries; empty when none."""
    return propagate.extract(carrier)
