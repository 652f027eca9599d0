"""What the OpenAI-compatible routes share, as TGI serves them (`router/src/server.rs`,
`lib.rs`, `chat.rs`):
  POST /v1/chat/completions   chat, through the model's chat template (openai_chat.py)
  POST /chat_tokenize         the templated text and its tokens (openai_chat.py)
  POST /v1/completions        legacy completions, 1..max_client_batch_size prompts
                              (openai_completions.py)
  GET  /v1/models             the served model as an OpenAI model list (here)

This module holds what the routes share: the request fields they have in common and how they
map to TGI's GenerateParameters, the response envelope and in-band stream errors; admission,
validation and metrics are the one path of generation.py. The mapping follows TGI's:
`temperature: 0` is greedy, any other temperature (or none) samples; `presence_penalty` p
becomes `repetition_penalty` p + 2.0; `max_tokens` (alias `max_completion_tokens`) is
`max_new_tokens` (absent: as many as fit, as on /generate).
Where TGI answers 422 to what OpenAI clients commonly send, we are lenient: `top_p: 1` means
"no top-p", any integer seed is taken modulo 2**64, `user` and `logit_bias` are ignored.
`n` other than 1 is a 422 (one choice per request). `model` can be any string; responses carry
the served model id.

Finish reasons and stop sequences follow OpenAI, as vLLM and llama.cpp do (strongly typed
clients reject TGI's `stop_sequence`): `stop` for EOS and for a stop sequence, whose text is
left out of the content; `length` otherwise. Logprobs that are not finite are written as
-9999.0, as vLLM does (OpenAI's schema has no null logprob).

Errors before a stream opens (bad JSON, template, unsupported fields) get an HTTP status; errors
inside a stream (overload, validation, generation) are `data: {"error": {"message",
"http_status_code"}}` followed by `data: [DONE]`, as TGI sends them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from router import VERSION
from router.batching.events import EndEvent, Token
from router.errors import BodyError, InferError, ValidationError
from router.http.jsonio import json_response
from router.http.sse import sse_data
from router.http.state import AppState, app_state
from router.request import ValidatedRequest
from router.validation.generate_request import GenerateParameters, Grammar
from router.validation.serde import (
    U32_MAX,
    Converter,
    boolean,
    describe,
    f32,
    integer,
    invalid_type,
    optional,
    string,
)

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
    "ignore_eos": optional(boolean),  # vLLM's extension, for benchmarks
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
        ignore_eos=bool(fields["ignore_eos"]),
    )


# ---- responses ----------------------------------------------------------------------------


def envelope(
    state: AppState, kind: str, created: int, choices: list[dict], usage: dict | None
) -> dict:
    """The frame shared by chat.completion(.chunk) and text_completion objects."""
    return {
        "id": "",
        "object": kind,
        "created": created,
        "model": state.config.model_id,
        "system_fingerprint": state.config.system_fingerprint or f"{VERSION}-native",
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
    """OpenAI's finish reason: "length", else "stop" (EOS or a stop sequence)."""
    return "length" if end.finish_reason == "length" else "stop"


def logprob(token: Token) -> float:
    """A logprob for an OpenAI response: never null (-9999.0 when not finite, as vLLM)."""
    return -9999.0 if token.logprob is None else token.logprob


def openai_error(err: InferError) -> bytes:
    """An error inside a /v1 stream (TGI's `into_openai_event`); `[DONE]` follows it."""
    return sse_data({"error": {"message": str(err), "http_status_code": err.status}})


# ---- concurrency ----------------------------------------------------------------------------


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
    return json_response({"object": "list", "data": [model]})
