"""A request's trace inside the batching loop: a `queued` span from admission until it joins a
batch, then an `infer` span until it ends, both children of the request's HTTP span (TGI's
names). The batch's own `prefill` span links to the `infer` spans of the requests it starts.
With tracing off these are the no-op tracer's spans, which record nothing."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import context, trace

from common.tracing import tracer


class RequestSpans:
    def __init__(self) -> None:
        self.parent = context.get_current()  # built in the request's task: its HTTP span
        self.queued = tracer().start_span("queued", context=self.parent)
        self.infer: trace.Span | None = None

    def started(self) -> None:
        """The request joined a batch."""
        if self.infer is None:
            _end(self.queued)
            self.infer = tracer().start_span("infer", context=self.parent)

    def link(self) -> trace.Link:
        span = self.infer if self.infer is not None else self.queued
        return trace.Link(span.get_span_context())

    def finished(self) -> None:
        """The request ended (or was cancelled), wherever it was."""
        _end(self.queued if self.infer is None else self.infer)


def _end(span: trace.Span) -> None:
    if span.is_recording():  # False once ended, and always for the no-op tracer's spans
        span.end()


def batch_span(name: str, batch_size: int, links: Sequence[trace.Link] = ()):
    """A `prefill` or `decode` step of the batching loop, current while its gRPC call runs, so
    that the shards' spans are its children."""
    return tracer().start_as_current_span(
        name, kind=trace.SpanKind.CLIENT, links=links, attributes={"batch_size": batch_size}
    )
