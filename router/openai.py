"""OpenAI-compatible routes, as TGI serves them (`router/src/server.rs`, `lib.rs`, `chat.rs`).

`add_openai_routes(app)` registers:
  POST /v1/chat/completions   chat, through the model's chat template (router/openai_chat.py)
  POST /chat_tokenize         the templated text and its tokens (router/openai_chat.py)
  POST /v1/completions        legacy completions, 1..max_client_batch_size prompts
                              (router/openai_completions.py)
  GET  /v1/models             the served model as an OpenAI model list (here)

This module holds what both routes share: the request fields they have in common and how they
map to TGI's GenerateParameters, the response envelope, in-band stream errors and admission
permits. The mapping follows TGI's: `temperature: 0` is greedy, any other temperature (or none)
samples; `presence_penalty` p becomes `repetition_penalty` p + 2.0; `max_tokens` (alias
`max_completion_tokens`) is `max_new_tokens` (absent: as many as fit, as on /generate).
Where TGI answers 422 to what OpenAI clients commonly send, we are lenient: `top_p: 1` means
"no top-p", any integer seed is taken modulo 2**64, `user` and `logit_bias` are ignored.
`n` other than 1 is a 422 (one choice per request). `model` can be any string; responses carry
the served model id.

Errors before a stream opens (bad JSON, template, unsupported fields) get an HTTP status; errors
inside a stream (overload, validation, generation) are `data: {"error": {"message",
"http_status_code"}}` followed by `data: [DONE]`, as TGI sends them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.entry import EndEvent, Token
from router.errors import BodyError, InferError, ValidationError
from router.infer import Permit
from router.json_body import loads_strict
from router.request import ValidatedRequest
from router.serde import U32_MAX, boolean, describe, f32, integer, invalid_type, optional, string
from router.streaming import sse_data
from router.validation import GenerateParameters, Grammar

if TYPE_CHECKING:
    from router.server import AppState

Converter = Callable[[Any, str], Any]
DONE = sse_data("[DONE]")
_U64 = 2**64


# ---- request fields -----------------------------------------------------------------------


def _any_seed(value: Any, path: str) -> int:
    """OpenAI clients send any integer (negative too); TGI's u64 seed is taken modulo 2**64."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid_type(path, value, "u64")
    return value % _U64


def _stop(value: Any, path: str) -> tuple[str, ...]:
    """A string or a list of strings (OpenAI allows both)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise invalid_type(path, value, "a string or a sequence of strings")
    return tuple(string(item, f"{path}[{i}]") for i, item in enumerate(value))


def _include_usage(value: Any, path: str) -> bool:
    """`stream_options: {"include_usage": bool}` -> the flag."""
    if not isinstance(value, dict):
        raise invalid_type(path, value, "struct StreamOptions")
    flag = value.get("include_usage")
    return False if flag is None else boolean(flag, f"{path}.include_usage")


def _ignored(value: Any, path: str) -> None:
    return None


_f32_or_none = optional(f32)
u32_or_none = optional(integer("u32", 0, U32_MAX))

COMMON_FIELDS: dict[str, Converter] = {
    "model": optional(string),
    "max_tokens": u32_or_none,
    "max_completion_tokens": u32_or_none,
    "temperature": _f32_or_none,
    "top_p": _f32_or_none,
    "top_k": optional(integer("i32", -(2**31), 2**31 - 1)),
    "seed": optional(_any_seed),
    "stop": optional(_stop),
    "frequency_penalty": _f32_or_none,
    "presence_penalty": _f32_or_none,
    "repetition_penalty": _f32_or_none,
    "stream": optional(boolean),
    "stream_options": optional(_include_usage),
    "n": optional(integer("u32", 0, U32_MAX)),
    "user": _ignored,
    "logit_bias": _ignored,
}


def parse_fields(
    body: Any, struct: str, fields: dict[str, Converter], required: tuple[str, ...]
) -> dict[str, Any]:
    """serde's view of an OpenAI request: unknown keys ignored, nulls accepted, the first bad
    field (in document order) reported as a 422 `BodyError`. Absent and null keys are None."""
    if not isinstance(body, dict):
        raise BodyError.json_data(f"invalid type: {describe(body)}, expected struct {struct}")
    values = {key: fields[key](value, key) for key, value in body.items() if key in fields}
    for name in required:
        if name not in body:
            raise BodyError.json_data(f"missing field `{name}`")
    return {name: values.get(name) for name in fields}


def check_n(n: int | None) -> None:
    """Several choices per request are not supported: `n` must be absent, null or 1."""
    if n is not None and n != 1:
        raise ValidationError(f"`n` must be 1 (one choice per request). Given: {n}")


def generate_parameters(
    fields: dict[str, Any],
    top_n_tokens: int | None = None,
    grammar: Grammar | None = None,
    return_full_text: bool | None = None,
) -> GenerateParameters:
    """TGI's ChatRequest/CompletionRequest -> GenerateParameters mapping (details always on)."""
    temperature = fields["temperature"]
    do_sample = temperature != 0.0  # TGI: only an explicit 0 is greedy
    repetition_penalty = fields["repetition_penalty"]
    if repetition_penalty is None and fields["presence_penalty"] is not None:
        repetition_penalty = fields["presence_penalty"] + 2.0
    max_tokens = fields["max_tokens"]
    return GenerateParameters(
        temperature=temperature if do_sample else None,
        repetition_penalty=repetition_penalty,
        frequency_penalty=fields["frequency_penalty"],
        top_k=fields["top_k"],
        top_p=None if fields["top_p"] == 1.0 else fields["top_p"],
        do_sample=do_sample,
        max_new_tokens=fields["max_completion_tokens"] if max_tokens is None else max_tokens,
        return_full_text=return_full_text,
        stop=fields["stop"] or (),
        details=True,
        seed=fields["seed"],
        top_n_tokens=top_n_tokens,
        grammar=grammar,
    )


async def read_json(request: web.Request) -> Any:
    """The JSON body, with the same rejections as the native routes (415, 400)."""
    if request.content_type != "application/json":
        raise BodyError.missing_json_content_type()
    return loads_strict(await request.read())


# ---- responses ----------------------------------------------------------------------------


def app_state(request: web.Request) -> AppState:
    # router.server imports this module to register the routes: look its names up late
    from router.server import STATE

    return request.app[STATE]


def system_fingerprint() -> str:
    from router.server import VERSION

    return f"{VERSION}-native"  # TGI: "{version}-{docker_label or 'native'}"


def envelope(
    state: AppState, kind: str, created: int, choices: list[dict], usage: dict | None
) -> dict:
    """The frame shared by chat.completion(.chunk) and text_completion objects."""
    return {
        "id": "",
        "object": kind,
        "created": created,
        "model": state.config.model_id,
        "system_fingerprint": system_fingerprint(),
        "choices": choices,
        "usage": usage,
    }


def unix_time() -> int:
    return int(time.time())


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def request_usage(request: ValidatedRequest, end: EndEvent) -> dict:
    return usage_json(request.input_length, end.generated_tokens)


def finish_reason(end: EndEvent) -> str:
    """TGI's `FinishReason::format(true)`: eos_token -> "stop"; length, stop_sequence as is."""
    return "stop" if end.finish_reason == "eos_token" else end.finish_reason


def stream_text(token: Token) -> str:
    """A streamed token's text; special tokens (EOS) are not content, as in the final text."""
    return "" if token.special else token.text


def openai_error(err: InferError) -> bytes:
    """An error inside a /v1 stream (TGI's `into_openai_event`); `[DONE]` follows it."""
    return sse_data({"error": {"message": str(err), "http_status_code": err.status}})


# ---- admission and concurrency ------------------------------------------------------------


def acquire(state: AppState, count: int) -> list[Permit]:
    """`count` admission permits, or none (OverloadedError) if they are not all free."""
    permits: list[Permit] = []
    try:
        for _ in range(count):
            permits.append(state.infer.acquire())
    except InferError:
        release(permits)
        raise
    return permits


def release(permits: list[Permit]) -> None:
    for permit in permits:
        permit.release()


async def gather_or_cancel(awaitables: list[Awaitable]) -> list:
    """Runs all concurrently; on the first failure the others are cancelled (which drops their
    requests from the batch and frees their blocks) before the error propagates."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- routes -------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    model_id = app_state(request).config.model_id
    model = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}
    return web.json_response({"object": "list", "data": [model]})


def add_openai_routes(app: web.Application) -> None:
    """Registers the OpenAI routes on an app made by `router.server.make_app`."""
    from router.openai_chat import chat_completions, chat_tokenize  # they import this module
    from router.openai_completions import completions

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/chat_tokenize", chat_tokenize)
    app.router.add_get("/v1/models", models)
