"""Admission and the per-request event stream between the HTTP handlers and the batcher.

`max_concurrent_requests` permits are taken without waiting (429 when none is left) and given
back when the request's stream ends, however it ends. A request whose `max_new_tokens` was not
given runs in chunks of at most 1024 new tokens (TGI's rule, so blocks are not reserved for the
whole context at once); each chunk continues from the previous output, and the client sees one
stream.

`best_of` (non-streaming, sampling only) runs that many copies of a request at once, each with
its own random seed, and keeps the one with the highest mean token logprob (TGI's
`Infer::generate_best_of`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from router.batching.entry import Entry
from router.batching.events import EndEvent, ErrorEvent, Event, PrefillEvent, Token, TokenEvent
from router.batching.output import OutputState
from router.batching.queue import Queue
from router.errors import OverloadedError
from router.request import SamplingParameters, ValidatedRequest, random_seed
from router.text.tokenizer import Tokenizer

CHUNK_NEW_TOKENS = 1024
F32_MAX = 3.4028234663852886e38  # TGI starts the best_of search at f32::MIN = -F32_MAX


def continuation(
    request: ValidatedRequest, chunk_ids: tuple[int, ...], remaining: int
) -> ValidatedRequest:
    """The next chunk of a long generation: the output so far becomes part of the prompt."""
    stopping = replace(request.stopping, max_new_tokens=min(remaining, CHUNK_NEW_TOKENS))
    return replace(
        request,
        input_ids=request.input_ids + tuple(chunk_ids),
        stopping=stopping,
        decoder_input_details=False,
        prefill_logprobs=False,
    )


class Permit:
    """One of the `max_concurrent_requests` slots; release() is idempotent."""

    def __init__(self, infer: Infer):
        self._infer = infer
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._infer.in_flight -= 1


@dataclass
class GenerateResult:
    """Everything a non-streaming request produced."""

    prefill: list[Token] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    content: str = ""  # the text with the stop sequence cut out (OpenAI's message content)
    end: EndEvent | None = None


class Infer:
    def __init__(
        self,
        queue: Queue,
        tokenizer: Tokenizer,
        max_concurrent_requests: int,
        max_total_tokens: int | None = None,
    ):
        self.queue = queue
        self.max_total_tokens = max_total_tokens  # a continuation never grows past it
        self.tokenizer = tokenizer
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0
        self._ids = itertools.count()

    def acquire(self) -> Permit:
        if self.in_flight >= self.max_concurrent_requests:
            raise OverloadedError()
        self.in_flight += 1
        return Permit(self)

    def acquire_many(self, n: int) -> list[Permit]:
        """n permits or none: OverloadedError when fewer than n are left."""
        if self.in_flight + n > self.max_concurrent_requests:
            raise OverloadedError()
        return [self.acquire() for _ in range(n)]

    async def generate_stream(self, request: ValidatedRequest) -> AsyncIterator[Event]:
        """Events until (and including) an EndEvent or an ErrorEvent."""
        output = OutputState(self.tokenizer, request)
        generated: list[int] = []
        while True:
            end = None
            async with aclosing(self._run_once(request, output)) as events:  # closed if we are
                async for event in events:  # ends after an End or Error event
                    if isinstance(event, EndEvent):
                        end = event
                        continue
                    yield event
                    if isinstance(event, ErrorEvent):
                        return
            generated += end.generated_ids
            remaining = request.stopping.max_total_new_tokens - len(generated)
            if self.max_total_tokens is not None:  # TGI: a chunk that no longer fits ends it
                room = self.max_total_tokens - request.input_length - len(end.generated_ids)
                remaining = min(remaining, room)
            if end.finish_reason != "length" or remaining <= 0:
                yield self._final(end, generated, output)
                return
            yield TokenEvent(end.token, end.top_tokens, end.content)  # not the end yet
            request = continuation(request, end.generated_ids, remaining)
            output.next_chunk(request)

    async def _run_once(
        self, request: ValidatedRequest, output: OutputState
    ) -> AsyncIterator[Event]:
        entry = Entry(next(self._ids), request, output)
        self.queue.append(entry)
        try:
            while True:
                event = await entry.events.get()
                yield event
                if isinstance(event, (EndEvent, ErrorEvent)):
                    return
        finally:
            entry.cancelled = True  # no-op once finished; otherwise the batcher drops it
            entry.spans.finished()

    def _final(self, end: EndEvent, generated: list[int], output: OutputState) -> EndEvent:
        """The last event of the whole generation: its text covers every chunk, and what the
        stop-sequence trimmer still held is visible after all."""
        content = end.content + output.flush()
        if len(generated) == len(end.generated_ids):
            return replace(end, content=content)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return replace(
            end,
            generated_text=text,
            generated_tokens=len(generated),
            generated_ids=tuple(generated),
            content=content,
        )

    async def generate(self, request: ValidatedRequest) -> GenerateResult:
        result = GenerateResult()
        async for event in self.generate_stream(request):
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, PrefillEvent):
                result.prefill = event.tokens
                continue
            result.tokens.append(event.token)
            result.top_tokens.append(event.top_tokens)
            result.content += event.content
            if isinstance(event, EndEvent):
                result.end = event
        return result

    async def generate_best_of(
        self, request: ValidatedRequest, n: int
    ) -> tuple[GenerateResult, list[GenerateResult]]:
        """n copies of `request`, each with a fresh random seed, run concurrently.

        Returns the copy with the highest mean token logprob, then the others in order.
        The caller holds the request's permit; the n - 1 other copies take one each (in
        TGI every copy is a request of its own, with its own permit), so this raises
        OverloadedError when they are not all free. The first copy to fail cancels the
        others (their blocks are freed) and its error is raised.
        """
        permits = self.acquire_many(n - 1)
        try:
            results = await _all_or_none(
                [self.generate(replace(request, sampling=_reseeded(request))) for _ in range(n)]
            )
        finally:
            for permit in permits:
                permit.release()
        best = _best_index(results)
        return results[best], results[:best] + results[best + 1 :]


def _reseeded(request: ValidatedRequest) -> SamplingParameters:
    return replace(request.sampling, seed=random_seed())


async def _all_or_none(coros: list[Coroutine]) -> list:
    """Await all coroutines concurrently (futures::try_join_all): the first exception
    cancels the rest and is raised as is. Cancelling the caller cancels them all."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def mean_logprob(result: GenerateResult) -> float:
    """Mean logprob of the generated tokens; NaN when there are none (as TGI's 0/0)."""
    logprobs = [math.nan if t.logprob is None else t.logprob for t in result.tokens]
    return sum(logprobs) / len(logprobs) if logprobs else math.nan


def _best_index(results: list[GenerateResult]) -> int:
    """TGI's choice: the first strictly highest mean logprob above f32::MIN, else 0."""
    best, best_logprob = 0, -F32_MAX
    for i, result in enumerate(results):
        logprob = mean_logprob(result)
        if logprob > best_logprob:
            best, best_logprob = i, logprob
    return best
