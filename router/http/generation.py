"""The one path every generating route takes, as TGI's `generate_internal` and
`generate_stream_internal`: count the request, run the checks TGI runs before admission, take a
permit, validate once, generate, record the outcome in the metrics and give the permit back,
however the request ends. A generation error also marks the server unhealthy until the next
health check passes.

Routes differ only in how they read their body and write their answer: `/generate`, `/`,
`/invocations`, `/v1/chat/completions` and `/v1/completions` (once per prompt) all call
`generate` for one answer or `GenerationStream` for events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from common.tracing import tracer
from router.batching.events import EndEvent, ErrorEvent, Event
from router.batching.infer import GenerateResult
from router.errors import GenerationError, InferError
from router.http.state import AppState
from router.http.tracing import record_timings
from router.request import ValidatedRequest
from router.validation.generate_request import GenerateRequest


@dataclass(frozen=True)
class Options:
    """What the route decides about a request, beyond its body."""

    add_special_tokens: bool = True  # false for chat: the template has them
    default_return_full_text: bool = False  # true on `/`, as TGI for text-generation models


@dataclass(frozen=True)
class Timings:
    received: float
    validated: float
    finished: float


@dataclass(frozen=True)
class Completion:
    """A finished non-streamed generation."""

    request: ValidatedRequest
    result: GenerateResult
    others: list[GenerateResult] | None  # the other best_of sequences
    timings: Timings


async def generate(state: AppState, request: GenerateRequest, options: Options) -> Completion:
    """One answer; raises the InferError that ended the request."""
    received = time.monotonic()
    state.metrics.request_started()
    with state.metrics.counting_failures():  # tgi_request_failure{err} for any InferError
        state.validation.precheck(request)
        permit = state.infer.acquire()
        try:
            validated = await _validate(state, request, options)
            validated_at = time.monotonic()
            others = None
            if validated.best_of > 1:
                result, others = await state.infer.generate_best_of(validated, validated.best_of)
            else:
                result = await state.infer.generate(validated)
        except GenerationError:
            state.health.request_failed()
            raise
        finally:
            permit.release()
    timings = Timings(received, validated_at, time.monotonic())
    state.metrics.request_succeeded(result.end, received, validated_at, timings.finished)
    record_timings(result.end, received, validated_at, timings.finished)
    return Completion(validated, result, others, timings)


class GenerationStream:
    """A streamed generation. Building it counts the request and runs the prechecks, whose
    errors get an HTTP status (as TGI); then `events()` admits, validates and generates,
    yielding an ErrorEvent for any error met from there on (overload included)."""

    def __init__(self, state: AppState, request: GenerateRequest, options: Options):
        self.state = state
        self.request = request
        self.options = options
        self.received = time.monotonic()
        self.validated: ValidatedRequest | None = None  # known once the first event is out
        self.validated_at = self.received
        state.metrics.request_started()
        with state.metrics.counting_failures():
            state.validation.precheck(request, stream=True)

    async def events(self) -> AsyncIterator[Event]:
        try:
            permit = self.state.infer.acquire()
        except InferError as err:
            self.state.metrics.request_failed(err)
            yield ErrorEvent(err)
            return
        try:
            async for event in self._generate():
                yield event
        finally:
            permit.release()

    async def _generate(self) -> AsyncIterator[Event]:
        state = self.state
        try:
            self.validated = await _validate(state, self.request, self.options)
        except InferError as err:
            state.metrics.request_failed(err)
            yield ErrorEvent(err)
            return
        self.validated_at = time.monotonic()
        async with aclosing(state.infer.generate_stream(self.validated)) as events:
            async for event in events:
                if isinstance(event, ErrorEvent):
                    state.health.request_failed()
                    state.metrics.request_failed(event.error)
                elif isinstance(event, EndEvent):
                    finished = time.monotonic()
                    state.metrics.request_succeeded(
                        event, self.received, self.validated_at, finished
                    )
                    record_timings(event, self.received, self.validated_at, finished)
                yield event


async def _validate(
    state: AppState, request: GenerateRequest, options: Options
) -> ValidatedRequest:
    with tracer().start_as_current_span("validate"):
        validated = await state.validation.validate(
            request,
            add_special_tokens=options.add_special_tokens,
            default_return_full_text=options.default_return_full_text,
        )
    state.metrics.request_validated(validated.input_length, validated.stopping.max_total_new_tokens)
    return validated
