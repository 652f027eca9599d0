"""The OpenAPI 3.1 document of the HTTP API, and the routes that serve it (`/api-doc/openapi.json`,
`/docs`).

The document describes the responses exactly as this server sends them, because it is also used
to validate real responses and to fuzz the server: which keys are always present, which are
omitted when empty, which are `null`, which statuses a route can answer and in which content type
(TGI's own `docs/openapi.json` is looser: it misses the text/plain body rejections, nulls and the
in-band stream errors). Schema names follow TGI's (`GenerateRequest`, `Details`, `StreamResponse`,
...). TGI's native response objects are closed (`additionalProperties: false`); the OpenAI ones
are open, as OpenAI adds fields and its clients ignore unknown keys. Request schemas are open:
unknown keys are ignored, and explicit `null` is accepted for every optional field.

Server-sent events: the `text/event-stream` schema is the schema of the JSON in each `data:` line
(as TGI documents it). `x-sse-terminator` names a final non-JSON `data:` line (`[DONE]` on the
OpenAI routes); without it the stream just ends.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

Schema = dict[str, Any]

TAG = "Text Generation Inference"
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
FINISH_REASONS = ["length", "eos_token", "stop_sequence"]
OPENAI_FINISH_REASONS = ["stop", "length", "stop_sequence", "tool_calls"]

# ------------------------------------------------------------------------------------------------
# Schema helpers


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or `null` (JSON Schema 2020-12: a type list, or anyOf for a $ref)."""
    if "type" in schema and "enum" not in schema and "const" not in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return {**schema, "type": [*types, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required=(), closed: bool = True, **extra) -> Schema:
    """An object; `closed` forbids keys not in `properties` (true for response shapes)."""
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def array(items: Schema, **extra) -> Schema:
    return {"type": "array", "items": items, **extra}


def integer(minimum: int | None = 0, maximum: int | None = None, **extra) -> Schema:
    schema: Schema = {"type": "integer", **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def string(**extra) -> Schema:
    return {"type": "string", **extra}


def number(**extra) -> Schema:
    return {"type": "number", **extra}


def boolean(**extra) -> Schema:
    return {"type": "boolean", **extra}


U32 = integer(0, U32_MAX)
U64 = integer(0, U64_MAX)  # seeds are random u64s: beyond int64, so no `format: int64`

# ------------------------------------------------------------------------------------------------
# TGI's native shapes (router/protocol.py, router/server.py)


F32_MAX = 3.4028234663852886e38
F32 = number(minimum=-F32_MAX, maximum=F32_MAX)  # finite f32
I32 = integer(-(2**31), 2**31 - 1)
# Values are rounded to f32 before the checks, so the exact bounds of what is accepted are the
# points halfway to the next f32 (ties round to even): x > 0 is x > 2**-150, x < 1 is
# x < 1 - 2**-25, |x| <= 2 is |x| <= 2 + 2**-23.
POSITIVE = {"exclusiveMinimum": 2**-150}
BELOW_ONE = {"exclusiveMaximum": 1 - 2**-25}
TWO = 2 + 2**-23


def generate_parameters(checked: bool = True) -> Schema:
    """Every field of router/validation.py:GenerateParameters. `checked`: with the static value
    rules of Validation too (as /generate applies them; /tokenize only parses the types). Limits
    that depend on the launcher's flags are only described."""

    def field(typed: Schema, description: str | None = None, **rules) -> Schema:
        schema = {**typed, **rules} if checked else dict(typed)
        if description:
            schema["description"] = description
        return nullable(schema)

    grammar = field(ref("GrammarType"))
    if checked:
        grammar = {"type": "null", "description": "Grammars are not supported yet (422)."}
    return obj(
        {
            "best_of": field(U64, "> 1 needs sampling and no seed; <= max_best_of."),
            "temperature": field(F32, "> 0", **POSITIVE),
            "repetition_penalty": field(F32, "> 0", **POSITIVE),
            "frequency_penalty": field(F32, "In [-2, 2].", minimum=-TWO, maximum=TWO),
            "top_k": field(I32, "> 0", minimum=1),
            "top_p": field(F32, "In (0, 1).", **POSITIVE, **BELOW_ONE),
            "typical_p": field(F32, "In (0, 1).", **POSITIVE, **BELOW_ONE),
            "do_sample": boolean(
                default=False,
                description="false when `parameters` is given, true when it is absent.",
            ),
            "max_new_tokens": field(U32, "null: up to max_total_tokens.", minimum=1),
            "return_full_text": nullable(
                boolean(description="Prepend the prompt; null: false on /generate, true on /.")
            ),
            "stop": array(string(), default=[], description="At most max_stop_sequences."),
            "truncate": field(U64, "<= max_input_tokens.", minimum=1),
            "watermark": boolean(default=False),
            "details": boolean(default=False),
            "decoder_input_details": boolean(
                default=False, description="Not allowed when streaming (HTTP 422)."
            ),
            "seed": field(U64),
            "top_n_tokens": field(U32, "<= max_top_n_tokens."),
            "grammar": grammar,
            "adapter_id": nullable(string()),
        },
        closed=False,
    )


def grammar_type() -> Schema:
    """serde's adjacently tagged enum: `{"type": ..., "value": ...}`."""

    def variant(kind: str, value: Schema) -> Schema:
        return obj({"type": {"const": kind}, "value": value}, ["type", "value"], closed=False)

    json_schema = obj({"name": nullable(string()), "schema": {}}, ["schema"], closed=False)
    return {
        "oneOf": [
            variant("json", {"description": "A JSON Schema, as an object or a string."}),
            variant("json_object", {"description": "Alias of `json`."}),
            variant("regex", string()),
            variant("json_schema", json_schema),
        ]
    }


def generate_request(with_stream: bool = False, parameters: str = "GenerateParameters") -> Schema:
    properties = {
        "inputs": string(minLength=1, example="My name is Olivier and I"),
        "parameters": ref(parameters),
    }
    if with_stream:
        properties["stream"] = boolean(default=False)
    return obj(properties, ["inputs"], closed=False)


def token() -> Schema:
    return obj(
        {
            "id": U32,
            "text": string(example="test"),
            "logprob": nullable(number(example=-0.34)),
            "special": boolean(),
        },
        ["id", "text", "logprob", "special"],
    )


def prefill_token() -> Schema:
    return obj(
        {
            "id": U32,
            "text": string(),
            "logprob": nullable(number(description="null for the first token.")),
        },
        ["id", "text", "logprob"],
    )


def sequence_properties() -> dict[str, Schema]:
    """What Details and BestOfSequence share."""
    return {
        "finish_reason": ref("FinishReason"),
        "generated_tokens": U32,
        "seed": nullable({**U64, "description": "The seed used; null when decoding was greedy."}),
        "prefill": array(ref("PrefillToken"), description="Empty unless decoder_input_details."),
        "tokens": array(ref("Token")),
        "top_tokens": array(array(ref("Token")), description="Present only when top_n_tokens > 0."),
    }


SEQUENCE_REQUIRED = ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]


def details() -> Schema:
    properties = sequence_properties()
    properties["best_of_sequences"] = array(
        ref("BestOfSequence"), description="The other sequences, present only when best_of > 1."
    )
    return obj(properties, SEQUENCE_REQUIRED)


def best_of_sequence() -> Schema:
    return obj({"generated_text": string(), **sequence_properties()}, SEQUENCE_REQUIRED)


def generate_response() -> Schema:
    return obj(
        {
            "generated_text": string(example="test"),
            "details": {
                **ref("Details"),
                "description": "Present only when details or decoder_input_details.",
            },
        },
        ["generated_text"],
    )


def stream_response() -> Schema:
    return obj(
        {
            "index": integer(1, U32_MAX, description="1 for the first event, then +1."),
            "token": ref("Token"),
            "top_tokens": array(ref("Token"), description="Present only when top_n_tokens > 0."),
            "generated_text": nullable(string(description="The whole text, on the last event.")),
            "details": nullable(
                {**ref("StreamDetails"), "description": "On the last event, when details."}
            ),
        },
        ["index", "token", "generated_text", "details"],
    )


def stream_details() -> Schema:
    return obj(
        {
            "finish_reason": ref("FinishReason"),
            "generated_tokens": U32,
            "seed": nullable(U64),
            "input_length": U32,
        },
        ["finish_reason", "generated_tokens", "seed", "input_length"],
    )


def error_response() -> Schema:
    return obj(
        {
            "error": string(example="Input validation error: `temperature` must be > 0"),
            "error_type": string(
                description="validation, generation, overloaded, incomplete_generation, "
                "incomplete_generation_stream, template_error, missing_template_variable, "
                "tool_error, healthcheck, ...",
                example="validation",
            ),
        },
        ["error", "error_type"],
    )


def info() -> Schema:
    counts = [
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
    ]
    properties = {
        "model_id": string(example="HuggingFaceTB/SmolLM2-135M-Instruct"),
        "model_sha": nullable(string()),
        "model_pipeline_tag": nullable(string(example="text-generation")),
        **{name: integer(0) for name in counts},
        "router": string(example="text-generation-router"),
        "version": string(),
        "sha": nullable(string()),
        "docker_label": nullable(string()),
    }
    return obj(properties, list(properties))


def simple_token() -> Schema:
    return obj(
        {
            "id": U32,
            "text": string(),
            "start": integer(0, description="Character offset in `inputs`."),
            "stop": integer(0),
        },
        ["id", "text", "start", "stop"],
    )


def native_schemas() -> dict[str, Schema]:
    return {
        "GenerateRequest": generate_request(with_stream=False),
        "CompatGenerateRequest": generate_request(with_stream=True),
        "GenerateParameters": generate_parameters(),
        "TokenizeRequest": generate_request(parameters="TokenizeParameters"),
        "TokenizeParameters": generate_parameters(checked=False),
        "GrammarType": grammar_type(),
        "GenerateResponse": generate_response(),
        "CompatGenerateResponse": array(ref("GenerateResponse"), minItems=1, maxItems=1),
        "Details": details(),
        "BestOfSequence": best_of_sequence(),
        "FinishReason": {"type": "string", "enum": FINISH_REASONS},
        "Token": token(),
        "PrefillToken": prefill_token(),
        "StreamResponse": stream_response(),
        "StreamDetails": stream_details(),
        "StreamEvent": {"oneOf": [ref("StreamResponse"), ref("ErrorResponse")]},
        "ErrorResponse": error_response(),
        "Info": info(),
        "SimpleToken": simple_token(),
        "TokenizeResponse": array(ref("SimpleToken")),
    }


# ------------------------------------------------------------------------------------------------
# OpenAI shapes (router/openai.py; TGI lib.rs ChatRequest/ChatCompletion/CompletionFinal/Chunk)


def chat_message() -> Schema:
    part = obj({"type": string(), "text": string(), "image_url": {}}, ["type"], closed=False)
    return obj(
        {
            "role": string(example="user"),
            "content": nullable({"anyOf": [string(), array(part)]}),
            "name": nullable(string()),
            "tool_calls": nullable(array({"type": "object"})),
            "tool_call_id": nullable(string()),
        },
        ["role"],
        closed=False,
    )


def sampling_properties() -> dict[str, Schema]:
    """The request fields chat and completions share (all optional, all nullable)."""
    return {
        "model": nullable(string(description="Ignored: any name is accepted.")),
        "max_tokens": nullable(integer(0, U32_MAX)),
        "temperature": nullable(number(minimum=0, description="0 means greedy.")),
        "top_p": nullable(number()),
        "seed": nullable(integer(None)),
        "stop": nullable({"anyOf": [string(), array(string())]}),
        "stream": nullable(boolean(default=False)),
        "stream_options": nullable(obj({"include_usage": nullable(boolean())}, closed=False)),
        "frequency_penalty": nullable(number()),
        "presence_penalty": nullable(number()),
        "repetition_penalty": nullable(number()),
        "top_k": nullable(integer(None)),
        "n": nullable(integer(None)),
        "user": nullable(string()),
        "logit_bias": nullable({"type": ["object", "array"]}),
    }


def chat_request() -> Schema:
    properties = {
        "messages": array(ref("ChatMessage")),
        **sampling_properties(),
        "max_completion_tokens": nullable(integer(0, U32_MAX)),
        "logprobs": nullable(boolean()),
        "top_logprobs": nullable(integer(0)),
        "tools": nullable(array({"type": "object"})),
        "tool_choice": nullable({"type": ["string", "object"]}),
        "tool_prompt": nullable(string()),
        "response_format": nullable({"type": "object"}),
    }
    return obj(properties, ["messages"], closed=False)


def completion_request() -> Schema:
    properties = {
        "prompt": {"anyOf": [string(), array(string())]},
        **sampling_properties(),
        "suffix": nullable(string(description="Not supported: a non-null suffix gives 422.")),
        "logprobs": nullable({"type": ["boolean", "integer"]}),
        "echo": nullable(boolean()),
    }
    return obj(properties, ["prompt"], closed=False)


def usage() -> Schema:
    return obj(
        {"prompt_tokens": integer(0), "completion_tokens": integer(0), "total_tokens": integer(0)},
        ["prompt_tokens", "completion_tokens", "total_tokens"],
        closed=False,
    )


def openai_envelope(kind: str, choice: str, with_usage: bool) -> Schema:
    """The common frame of chat.completion(.chunk) and text_completion objects."""
    properties = {
        "object": {"const": kind},
        "id": string(),
        "created": integer(0, description="Unix time (s)."),
        "model": string(),
        "system_fingerprint": string(),
        "choices": array(ref(choice)),
        "usage": ref("Usage") if with_usage else nullable(ref("Usage")),
    }
    required = ["object", "id", "created", "model", "system_fingerprint", "choices"]
    return obj(properties, required + ["usage"] if with_usage else required, closed=False)


def chat_logprobs() -> Schema:
    top = obj({"token": string(), "logprob": number()}, ["token", "logprob"], closed=False)
    item = obj(
        {"token": string(), "logprob": number(), "top_logprobs": array(top)},
        ["token", "logprob", "top_logprobs"],
        closed=False,
    )
    return obj({"content": nullable(array(item))}, ["content"], closed=False)


def tool_call(delta: bool) -> Schema:
    function = obj(
        {"name": string(), "arguments": string()}, [] if delta else ["name"], closed=False
    )
    properties = {"id": string(), "type": string(), "function": function}
    if delta:
        return obj({"index": integer(0), **properties}, ["index"], closed=False)
    return obj(properties, ["id", "type", "function"], closed=False)


def chat_output_message(delta: bool) -> Schema:
    properties = {
        "role": {"const": "assistant"},
        "content": nullable(string()),
        "tool_calls": nullable(array(ref("ChatDeltaToolCall" if delta else "ChatToolCall"))),
    }
    return obj(properties, [] if delta else ["role"], closed=False)


def chat_choice(delta: bool) -> Schema:
    reasons = {"type": "string", "enum": OPENAI_FINISH_REASONS}
    properties = {
        "index": integer(0),
        "delta" if delta else "message": ref("ChatDelta" if delta else "ChatOutputMessage"),
        "logprobs": nullable(ref("ChatCompletionLogprobs")),
        "finish_reason": nullable(reasons) if delta else reasons,
    }
    required = ["index", "delta"] if delta else ["index", "message", "logprobs", "finish_reason"]
    return obj(properties, required, closed=False)


def completion_choice(chunk: bool) -> Schema:
    openai_logprobs = obj(
        {"tokens": array(string()), "token_logprobs": array(nullable(number()))}, closed=False
    )
    reasons = {"type": "string", "enum": OPENAI_FINISH_REASONS}
    if chunk:  # TGI sends "" on every chunk of a completion stream
        reasons = {"type": "string", "enum": [*OPENAI_FINISH_REASONS, ""]}
    properties = {
        "index": integer(0),
        "text": string(),
        "logprobs": nullable({"anyOf": [array(number()), openai_logprobs]}),
        "finish_reason": nullable(reasons) if chunk else reasons,
    }
    return obj(
        properties, ["index", "text"] if chunk else ["index", "text", "finish_reason"], closed=False
    )


def openai_stream_error() -> Schema:
    inner = obj(
        {"message": string(), "http_status_code": integer(100, 599)},
        ["message", "http_status_code"],
        closed=False,
    )
    return obj({"error": inner}, ["error"], closed=False)


def models_list() -> Schema:
    model = obj(
        {"id": string(), "object": {"const": "model"}, "created": integer(0), "owned_by": string()},
        ["id", "object", "created", "owned_by"],
        closed=False,
    )
    return obj(
        {"object": {"const": "list"}, "data": array(model)}, ["object", "data"], closed=False
    )


def openai_schemas() -> dict[str, Schema]:
    return {
        "ChatRequest": chat_request(),
        "ChatMessage": chat_message(),
        "CompletionRequest": completion_request(),
        "Usage": usage(),
        "ChatCompletion": openai_envelope("chat.completion", "ChatCompletionComplete", True),
        "ChatCompletionComplete": chat_choice(delta=False),
        "ChatOutputMessage": chat_output_message(delta=False),
        "ChatToolCall": tool_call(delta=False),
        "ChatCompletionLogprobs": chat_logprobs(),
        "ChatCompletionChunk": openai_envelope(
            "chat.completion.chunk", "ChatCompletionChoice", False
        ),
        "ChatCompletionChoice": chat_choice(delta=True),
        "ChatDelta": chat_output_message(delta=True),
        "ChatDeltaToolCall": tool_call(delta=True),
        "ChatStreamEvent": {"oneOf": [ref("ChatCompletionChunk"), ref("OpenAIStreamError")]},
        "Completion": openai_envelope("text_completion", "CompletionComplete", True),
        "CompletionComplete": completion_choice(chunk=False),
        "CompletionChunk": openai_envelope("text_completion", "CompletionChunkChoice", False),
        "CompletionChunkChoice": completion_choice(chunk=True),
        "CompletionStreamEvent": {"oneOf": [ref("CompletionChunk"), ref("OpenAIStreamError")]},
        "OpenAIStreamError": openai_stream_error(),
        "ModelsList": models_list(),
        "ChatTokenizeResponse": obj(
            {"tokenize_response": ref("TokenizeResponse"), "templated_text": string()},
            ["tokenize_response", "templated_text"],
        ),
    }


# ------------------------------------------------------------------------------------------------
# Responses and operations


def json_body(schema: Schema) -> dict:
    return {"application/json": {"schema": schema}}


def sse_body(event: Schema, terminator: str | None = None) -> dict:
    media: dict = {"schema": event}
    if terminator:
        media["x-sse-terminator"] = terminator
    return {"text/event-stream": media}


def text_body() -> dict:
    return {"text/plain": {"schema": string()}}


def header(required: bool, schema: Schema, description: str) -> dict:
    return {"required": required, "schema": schema, "description": description}


SECONDS = string(pattern=r"^[0-9]+(\.[0-9]+)?$")
INTEGER_TEXT = string(pattern=r"^[0-9]+$")


def timing_headers(required: bool) -> dict:
    """The x-* headers of a non-streamed generation (times in ms unless said otherwise)."""
    names = [
        "x-compute-characters",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-prompt-tokens",
        "x-generated-tokens",
    ]
    headers = {name: header(required, INTEGER_TEXT, name[2:]) for name in names}
    headers["x-compute-time"] = header(required, SECONDS, "Seconds.")
    headers["x-compute-type"] = header(True, string(), "Hardware label.")
    return headers


def sse_headers() -> dict:
    return {
        "Cache-Control": header(True, {"const": "no-cache"}, "Never cached."),
        "X-Accel-Buffering": header(True, {"const": "no"}, "No proxy buffering."),
        "x-compute-type": header(True, string(), "Hardware label."),
    }


def response(description: str, content: dict | None = None, headers: dict | None = None) -> dict:
    out: dict = {"description": description}
    if content:
        out["content"] = content
    if headers:
        out["headers"] = headers
    return out


def error(description: str) -> dict:
    return response(description, json_body(ref("ErrorResponse")))


def body_rejections(json_errors: bool = True) -> dict[str, dict]:
    """What can happen before a POST handler runs, plus the JSON errors of inference routes."""
    out = {
        "400": response("The body is not valid JSON (text/plain).", text_body()),
        "401": response("Missing or wrong bearer token (only with --api-key); empty body."),
        "413": response("The body is larger than --payload-limit (text/plain).", text_body()),
        "415": response("Content-Type is not application/json (text/plain).", text_body()),
        "422": response(
            "Validation error (JSON), or a body of the wrong shape (text/plain).",
            {**json_body(ref("ErrorResponse")), **text_body()},
        ),
    }
    if json_errors:
        out["424"] = error("The shard failed during generation.")
        out["429"] = error("Model is overloaded (max_concurrent_requests).")
        out["500"] = error("Incomplete generation.")
    return out


def operation(op_id: str, summary: str, responses: dict, body: str | None = None) -> dict:
    op: dict = {"tags": [TAG], "summary": summary, "operationId": op_id, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": json_body(ref(body))}
        op["security"] = [{}, {"bearerAuth": []}]
    return op


def sse_headers_optional() -> dict:
    return {name: {**spec, "required": False} for name, spec in sse_headers().items()}


def generate_paths() -> dict:
    """/generate, /generate_stream and POST /. A stream answers 200 even for the errors met
    while generating (they arrive as events), so it has no 424/429/500."""
    generate_ok = response(
        "The generation.", json_body(ref("GenerateResponse")), timing_headers(True)
    )
    stream_ok = response(
        "One event per token; the last one has generated_text (and details). Errors met while "
        "generating arrive as an ErrorResponse event, then the stream ends. No [DONE].",
        sse_body(ref("StreamEvent")),
        sse_headers(),
    )
    compat_ok = response(
        "A one-item list (stream false) or the events of /generate_stream (stream true).",
        {**json_body(ref("CompatGenerateResponse")), **sse_body(ref("StreamEvent"))},
        {**sse_headers_optional(), **timing_headers(False)},
    )
    return {
        "/": {
            "post": operation(
                "compat_generate",
                "Generate; a stream when `stream` is true",
                {"200": compat_ok, **body_rejections()},
                "CompatGenerateRequest",
            ),
        },
        "/generate": {
            "post": operation(
                "generate",
                "Generate tokens",
                {"200": generate_ok, **body_rejections()},
                "GenerateRequest",
            )
        },
        "/generate_stream": {
            "post": operation(
                "generate_stream",
                "Generate a stream of tokens (server-sent events)",
                {"200": stream_ok, **body_rejections(json_errors=False)},
                "GenerateRequest",
            )
        },
    }


def info_paths() -> dict:
    """/tokenize, the health checks, /info and /metrics."""
    health = {
        "200": response("Healthy; empty body."),
        "503": error("The shards do not answer; error_type `healthcheck`."),
    }
    tokens = response("The tokens.", json_body(ref("TokenizeResponse")))
    return {
        "/": {"get": operation("root_health", "Health check (same as /health)", health)},
        "/tokenize": {
            "post": operation(
                "tokenize",
                "Tokenize inputs",
                {"200": tokens, **body_rejections(json_errors=False)},
                "TokenizeRequest",
            )
        },
        "/health": {"get": operation("health", "Health check", health)},
        "/ping": {"get": operation("ping", "Health check (same as /health)", health)},
        "/info": {
            "get": operation(
                "get_model_info",
                "Model and router info",
                {"200": response("Info.", json_body(ref("Info")))},
            )
        },
        "/metrics": {
            "get": operation(
                "metrics",
                "Prometheus metrics",
                {"200": response("Prometheus text format 0.0.4.", text_body())},
            )
        },
    }


def openai_paths() -> dict:
    chat_ok = response(
        "A chat.completion, or chat.completion.chunk events (stream true) ending with "
        "`data: [DONE]`; errors while streaming arrive as an OpenAIStreamError event.",
        {
            **json_body(ref("ChatCompletion")),
            **sse_body(ref("ChatStreamEvent"), "[DONE]"),
        },
    )
    completion_ok = response(
        "A text_completion, or text_completion events (stream true) ending with `data: [DONE]`.",
        {
            **json_body(ref("Completion")),
            **sse_body(ref("CompletionStreamEvent"), "[DONE]"),
        },
    )
    tokenize_ok = response(
        "The templated text and its tokens.", json_body(ref("ChatTokenizeResponse"))
    )
    return {
        "/v1/chat/completions": {
            "post": operation(
                "chat_completions",
                "OpenAI chat completions",
                {"200": chat_ok, **body_rejections()},
                "ChatRequest",
            )
        },
        "/v1/completions": {
            "post": operation(
                "completions",
                "OpenAI (legacy) completions",
                {"200": completion_ok, **body_rejections()},
                "CompletionRequest",
            )
        },
        "/v1/models": {
            "get": operation(
                "openai_get_model_info",
                "The served model, as an OpenAI model list",
                {"200": response("The model list.", json_body(ref("ModelsList")))},
            )
        },
        "/chat_tokenize": {
            "post": operation(
                "get_chat_tokenize",
                "Apply the chat template and tokenize",
                {"200": tokenize_ok, **body_rejections(json_errors=False)},
                "ChatRequest",
            )
        },
    }


def docs_paths() -> dict:
    return {
        "/api-doc/openapi.json": {
            "get": operation(
                "openapi",
                "This document",
                {"200": response("OpenAPI 3.1.", json_body({"type": "object"}))},
            )
        },
        "/docs": {
            "get": operation(
                "docs",
                "Swagger UI",
                {"200": response("An HTML page.", {"text/html": {"schema": string()}})},
            )
        },
    }


def paths() -> dict:
    """Every route; `/` has both GET (health) and POST (compat generate)."""
    out: dict = {}
    for group in (generate_paths(), info_paths(), openai_paths(), docs_paths()):
        for path, operations in group.items():
            out[path] = {**out.get(path, {}), **operations}
    return out


def openapi_document(version: str) -> dict:
    """The whole OpenAPI 3.1 document, as a JSON-serializable dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Text Generation Inference",
            "description": "TGI-compatible text generation server.",
            "license": {"name": "Apache 2.0", "identifier": "Apache-2.0"},
            "version": version,
        },
        "tags": [{"name": TAG}],
        "paths": paths(),
        "components": {
            "schemas": {**native_schemas(), **openai_schemas()},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


# ------------------------------------------------------------------------------------------------
# Routes

# Swagger UI comes from a CDN: the browser fetches it, the server needs no network. Offline, the
# page still loads and links to the raw document.
SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Text Generation Inference API</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui">
<p>Loading Swagger UI. Without network access, read the
<a href="api-doc/openapi.json">OpenAPI document</a> directly.</p>
</div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js" crossorigin></script>
<script>
if (window.SwaggerUIBundle) {{
  SwaggerUIBundle({{url: "api-doc/openapi.json", dom_id: "#swagger-ui"}});
}}
</script>
</body>
</html>
"""


def add_docs_routes(app: web.Application, version: str | None = None) -> None:
    """Registers GET /api-doc/openapi.json and GET /docs (the document is built once)."""
    if version is None:
        from router.server import VERSION  # here, not at the top: server.py imports this module

        version = VERSION
    document = json.dumps(openapi_document(version))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(text=document, content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=DOCS_HTML, content_type="text/html")

    app.router.add_get("/api-doc/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
