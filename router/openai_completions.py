"""`POST /v1/completions` (TGI's `completions`): OpenAI's legacy text completions.

`prompt` is a string or a list of at most `max_client_batch_size` strings. Each prompt is one
request: it takes its own admission permit, and all run concurrently. Choices come back in
prompt order (`index` = the prompt's position); a stream interleaves the prompts' chunks as
tokens arrive and ends with `data: [DONE]`. Each prompt's last chunk carries its finish_reason
and usage (as TGI), and `stream_options.include_usage` adds a final `choices: []` chunk with the
total. `echo` prepends the prompt to the text; `logprobs: n` returns OpenAI's legacy
`{tokens, token_logprobs, top_logprobs, text_offset}` with up to n alternatives per token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.entry import EndEvent, ErrorEvent, Event, PrefillEvent, Token
from router.errors import GenerationError, InferError, ValidationError
from router.infer import GenerateResult
from router.openai import (
    COMMON_FIELDS,
    DONE,
    acquire,
    app_state,
    check_n,
    envelope,
    finish_reason,
    gather_or_cancel,
    generate_parameters,
    openai_error,
    parse_fields,
    read_json,
    release,
    request_usage,
    stream_text,
    unix_time,
    usage_json,
)
from router.protocol import INTEGER_TIMING_HEADERS, full_text, timing_headers
from router.request import ValidatedRequest
from router.serde import boolean, invalid_type, optional, string
from router.streaming import open_stream, sse_data, with_keep_alive
from router.validation import GenerateRequest

if TYPE_CHECKING:
    from router.server import AppState

log = logging.getLogger(__name__)

# ---- request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    requests: list[GenerateRequest]  # one per prompt
    stream: bool
    include_usage: bool
    logprobs: bool


def _prompts(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid_type(path, value, "a string or a sequence of strings")
    return [string(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _logprobs(value: Any, path: str) -> int | bool:
    """Legacy `logprobs`: the number of alternatives (0..); a boolean is accepted too."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, int) or value < 0:
        raise invalid_type(path, value, "a non-negative integer")
    return value


COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": _prompts,
    "suffix": optional(string),
    "echo": optional(boolean),
    "logprobs": optional(_logprobs),
}


def parse_completion_request(body: Any, max_client_batch_size: int) -> CompletionRequest:
    """The body of /v1/completions, or a 422 (TGI's suffix and batch size errors included)."""
    fields = parse_fields(body, "CompletionRequest", COMPLETION_FIELDS, ("prompt",))
    if fields["suffix"] is not None:
        raise InferError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            status=422,
            error_type="suffix not supported",
        )
    prompts = fields["prompt"]
    if len(prompts) > max_client_batch_size:
        raise InferError(
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}",
            status=422,
            error_type="batch size exceeded",
        )
    if not prompts:
        raise ValidationError("`inputs` cannot be empty")
    check_n(fields["n"])
    logprobs = fields["logprobs"]
    top_n = logprobs if logprobs is not None and not isinstance(logprobs, bool) else None
    parameters = generate_parameters(fields, top_n, return_full_text=bool(fields["echo"]))
    return CompletionRequest(
        requests=[GenerateRequest(prompt, parameters) for prompt in prompts],
        stream=bool(fields["stream"]),
        include_usage=bool(fields["stream_options"]),
        logprobs=logprobs is not None and logprobs is not False,
    )


# ---- response shapes ------------------------------------------------------------------------


def legacy_logprobs(tokens: list[Token], top_tokens: list[list[Token]], offset: int) -> dict:
    """OpenAI's legacy logprobs; `text_offset` counts characters of the returned text (special
    tokens, absent from the text, take no room)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(stream_text(token))
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{t.text: t.logprob for t in top} for top in top_tokens],
        "text_offset": offsets,
    }


def choice_json(
    index: int, request: ValidatedRequest, result: GenerateResult, logprobs: bool
) -> dict:
    echo = len(request.inputs) if request.return_full_text else 0
    return {
        "index": index,
        "text": full_text(request, result.end.generated_text),
        "logprobs": legacy_logprobs(result.tokens, result.top_tokens, echo) if logprobs else None,
        "finish_reason": finish_reason(result.end),
    }


def summed_headers(all_headers: list[dict[str, str]]) -> dict[str, str]:
    """TGI adds up the x-* timing headers of the prompts."""
    out = {"x-compute-type": all_headers[0]["x-compute-type"]}
    for name in INTEGER_TIMING_HEADERS:  # summed over the prompts, as TGI
        out[name] = str(sum(int(h[name]) for h in all_headers))
    out["x-compute-time"] = f"{sum(float(h['x-compute-time']) for h in all_headers):.6f}"
    return out


# ---- handlers -------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    state = app_state(request)
    body = await read_json(request)
    completion = parse_completion_request(body, state.config.max_client_batch_size)
    if completion.stream:
        return await _stream(request, state, completion)
    return await _complete(state, completion)


async def _validate_all(
    state: AppState, completion: CompletionRequest, stream: bool = False
) -> list[ValidatedRequest]:
    return [await state.validation.validate(r, stream=stream) for r in completion.requests]


async def _complete(state: AppState, completion: CompletionRequest) -> web.Response:
    received = time.monotonic()
    permits = acquire(state, len(completion.requests))
    try:
        validated = await _validate_all(state, completion)
        validated_at = time.monotonic()
        results = await gather_or_cancel([state.infer.generate(v) for v in validated])
    except GenerationError:
        state.health.request_failed()
        raise
    finally:
        release(permits)
    finished = time.monotonic()
    pairs = list(zip(validated, results))
    choices = [choice_json(i, v, r, completion.logprobs) for i, (v, r) in enumerate(pairs)]
    usage = usage_json(
        sum(v.input_length for v in validated), sum(r.end.generated_tokens for r in results)
    )
    body = envelope(state, "text_completion", unix_time(), choices, usage)
    headers = [timing_headers(v, r.end, received, validated_at, finished) for v, r in pairs]
    return web.json_response(body, headers=summed_headers(headers))


async def _stream(
    request: web.Request, state: AppState, completion: CompletionRequest
) -> web.StreamResponse:
    """SSE chunks of every prompt then `data: [DONE]`; overload, validation and generation
    errors arrive in-band (the first one ends the whole stream)."""
    response = await open_stream(request)
    try:
        permits = acquire(state, len(completion.requests))
    except InferError as err:
        await response.write(openai_error(err))
        await response.write(DONE)
        return response
    try:
        await _stream_events(state, response, completion)
    finally:
        release(permits)
    await response.write(DONE)
    return response


async def _pump(index: int, events: AsyncIterator[Event], queue: asyncio.Queue) -> None:
    """Moves one prompt's events to the shared queue; (index, None) marks its end."""
    try:
        async with aclosing(events):
            async for event in events:
                queue.put_nowait((index, event))
    finally:
        queue.put_nowait((index, None))


async def _merged(queue: asyncio.Queue, count: int) -> AsyncIterator[tuple[int, Event]]:
    """(prompt index, event) in arrival order until every prompt has ended."""
    ended = 0
    while ended < count:
        index, event = await queue.get()
        if event is None:
            ended += 1
            continue
        yield index, event


class _StreamState:
    """What the chunks of one stream need: prompts, text offsets, the usage so far."""

    def __init__(
        self, state: AppState, completion: CompletionRequest, validated: list[ValidatedRequest]
    ):
        self.state = state
        self.completion = completion
        self.validated = validated
        self.created = unix_time()
        self.offsets = [len(v.inputs) if v.return_full_text else 0 for v in validated]
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def chunk(self, index: int, text: str, logprobs: dict | None, end: EndEvent | None) -> bytes:
        usage = None
        if end is not None:
            usage = request_usage(self.validated[index], end)
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(end) if end is not None else None,
        }
        return sse_data(envelope(self.state, "text_completion", self.created, [choice], usage))

    def token_chunk(
        self, index: int, token: Token, top: list[Token], end: EndEvent | None
    ) -> bytes:
        logprobs = None
        if self.completion.logprobs:
            logprobs = legacy_logprobs([token], [top], self.offsets[index])
        self.offsets[index] += len(stream_text(token))
        return self.chunk(index, stream_text(token), logprobs, end)

    def usage_chunk(self) -> bytes:
        usage = usage_json(self.prompt_tokens, self.completion_tokens)
        return sse_data(envelope(self.state, "text_completion", self.created, [], usage))


async def _stream_events(
    state: AppState, response: web.StreamResponse, completion: CompletionRequest
) -> None:
    try:
        validated = await _validate_all(state, completion, stream=True)
    except InferError as err:
        await response.write(openai_error(err))
        return
    chunks = _StreamState(state, completion, validated)
    for index, v in enumerate(validated):
        if v.return_full_text:  # echo: the prompt comes first
            await response.write(chunks.chunk(index, v.inputs, None, None))
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [
        asyncio.create_task(_pump(i, state.infer.generate_stream(v), queue))
        for i, v in enumerate(validated)
    ]
    try:
        if await _write_events(state, response, chunks, _merged(queue, len(tasks))):
            if completion.include_usage:
                await response.write(chunks.usage_chunk())
    finally:  # a client that left, or an error: every prompt leaves the batch
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("completion stream failed: %r", outcome)


async def _write_events(
    state: AppState, response: web.StreamResponse, chunks: _StreamState, events: AsyncIterator
) -> bool:
    """Writes every prompt's chunks; False when an error event ended the stream."""
    async for index, event in with_keep_alive(events, response):
        if isinstance(event, PrefillEvent):
            continue
        if isinstance(event, ErrorEvent):
            state.health.request_failed()
            await response.write(openai_error(event.error))
            return False
        end = event if isinstance(event, EndEvent) else None
        await response.write(chunks.token_chunk(index, event.token, event.top_tokens, end))
    return True
