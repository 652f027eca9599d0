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
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from router.batching.events import EndEvent, ErrorEvent, Event, PrefillEvent, Token
from router.errors import InferError, ValidationError
from router.http.generation import Completion, GenerationStream, Options, generate
from router.http.jsonio import json_response, read_json
from router.http.openai_common import (
    COMMON_FIELDS,
    DONE,
    check_n,
    envelope,
    finish_reason,
    gather_or_cancel,
    generate_parameters,
    logprob,
    openai_error,
    parse_fields,
    request_usage,
    unix_time,
    usage_json,
)
from router.http.responses import INTEGER_TIMING_HEADERS, timing_headers
from router.http.sse import ClientGone, EventStream, sse_data
from router.http.state import AppState, app_state
from router.validation.generate_request import GenerateRequest
from router.validation.serde import boolean, invalid_type, optional, string

PROMPT = Options()

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


def visible(token: Token) -> str:
    """A token's text as the completion shows it: special tokens (EOS) are not text."""
    return "" if token.special else token.text


def legacy_logprobs(tokens: list[Token], top_tokens: list[list[Token]], offset: int) -> dict:
    """OpenAI's legacy logprobs; `text_offset` counts characters of the returned text (special
    tokens, absent from the text, take no room)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(visible(token))
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [logprob(t) for t in tokens],
        "top_logprobs": [{t.text: logprob(t) for t in top} for top in top_tokens],
        "text_offset": offsets,
    }


def choice_json(index: int, done: Completion, logprobs: bool) -> dict:
    request, result = done.request, done.result
    text = (
        result.content if result.end.finish_reason == "stop_sequence" else result.end.generated_text
    )
    echo = request.inputs if request.return_full_text else ""
    return {
        "index": index,
        "text": echo + text,
        "logprobs": legacy_logprobs(result.tokens, result.top_tokens, len(echo))
        if logprobs
        else None,
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
    return await complete(request, await read_json(request))


async def complete(request: web.Request, body: Any) -> web.StreamResponse:
    """A completion request's body -> its answer (also reached through /invocations). Each
    prompt is a request of its own (its permit, its metrics), run concurrently."""
    state = app_state(request)
    completion = parse_completion_request(body, state.config.max_client_batch_size)
    if completion.stream:
        return await _stream(request, state, completion)
    done = await gather_or_cancel([generate(state, r, PROMPT) for r in completion.requests])
    choices = [choice_json(i, d, completion.logprobs) for i, d in enumerate(done)]
    usage = usage_json(
        sum(d.request.input_length for d in done),
        sum(d.result.end.generated_tokens for d in done),
    )
    body = envelope(state, "text_completion", unix_time(), choices, usage)
    headers = [
        timing_headers(d.request, d.result.end, d.timings, state.config.compute_type) for d in done
    ]
    return json_response(body, headers=summed_headers(headers))


async def _stream(
    request: web.Request, state: AppState, completion: CompletionRequest
) -> web.StreamResponse:
    """SSE chunks of every prompt then `data: [DONE]`; overload, validation and generation
    errors arrive in-band (the first one ends the whole stream)."""
    generations = [GenerationStream(state, r, PROMPT) for r in completion.requests]
    sse = await EventStream.open(
        request, state.config.stream_write_timeout, state.config.compute_type
    )
    chunks = _Chunks(state, completion)
    try:
        for index, r in enumerate(completion.requests):
            if r.parameters.return_full_text:  # echo: the prompt comes first
                await sse.write(chunks.chunk(index, r.inputs, None, None))
    except ClientGone:
        return sse.response
    merged = _merged([g.events() for g in generations])
    failed = False

    def render(item: tuple[int, Event]) -> Iterable[bytes]:
        nonlocal failed
        index, event = item
        if failed or isinstance(event, PrefillEvent):
            return ()
        if isinstance(event, ErrorEvent):
            failed = True  # the first error ends the stream: the other prompts are dropped
            return (openai_error(event.error),)
        end = event if isinstance(event, EndEvent) else None
        return (chunks.token_chunk(index, generations[index], event, end),)

    sent = await sse.send(_until_error(merged, lambda: failed), render)
    if sent:
        if not failed and completion.include_usage:
            await sse.write_last(chunks.usage_chunk())
        await sse.write_last(DONE)
    return sse.response


async def _until_error(events: AsyncIterator, failed) -> AsyncIterator:
    async with aclosing(events):
        async for item in events:
            yield item
            if failed():
                return


async def _merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """(prompt index, event) in arrival order until every prompt has ended; closing it
    cancels the prompts still running (their requests leave the batch)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[Event]) -> None:
        try:
            async with aclosing(events):
                async for event in events:
                    queue.put_nowait((index, event))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(tasks):
            index, event = await queue.get()
            if event is None:
                ended += 1
                continue
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Chunks:
    """What the chunks of one stream need: text offsets and the usage so far."""

    def __init__(self, state: AppState, completion: CompletionRequest):
        self.state = state
        self.completion = completion
        self.created = unix_time()
        self.offsets = [
            len(r.inputs) if r.parameters.return_full_text else 0 for r in completion.requests
        ]
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def chunk(self, index: int, text: str, logprobs: dict | None, usage: dict | None) -> bytes:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": None,
        }
        return sse_data(envelope(self.state, "text_completion", self.created, [choice], usage))

    def token_chunk(
        self, index: int, generation: GenerationStream, event: Event, end: EndEvent | None
    ) -> bytes:
        logprobs = None
        if self.completion.logprobs:
            logprobs = legacy_logprobs([event.token], [event.top_tokens], self.offsets[index])
        self.offsets[index] += len(visible(event.token))
        usage = None
        if end is not None:
            usage = request_usage(generation.validated, end)
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
        choice = {
            "index": index,
            "text": event.content,
            "logprobs": logprobs,
            "finish_reason": finish_reason(end) if end is not None else None,
        }
        return sse_data(envelope(self.state, "text_completion", self.created, [choice], usage))

    def usage_chunk(self) -> bytes:
        usage = usage_json(self.prompt_tokens, self.completion_tokens)
        return sse_data(envelope(self.state, "text_completion", self.created, [], usage))
