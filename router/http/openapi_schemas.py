"""The component schemas of the OpenAPI document (`router/openapi.py`): small JSON Schema
builders and TGI's native shapes. The OpenAI shapes are in `router/openapi_openai_schemas.py`.
See `router/openapi.py` for the conventions (closed native responses, open requests, nulls).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
FINISH_REASONS = ["length", "eos_token", "stop_sequence"]

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
# At least the smallest normal f32 once rounded to f32 (the tie below it rounds up to it).
DIVISOR = {"minimum": 2**-126 - 2**-150}
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

    grammar = field(
        ref("GrammarType"),
        "The output follows it (JSON schemas need `properties`; at most 64 KiB); "
        "HTTP 422 when it does not compile or with --disable-grammar-support.",
    )
    return obj(
        {
            "best_of": field(U64, "> 1 needs sampling and no seed; <= max_best_of."),
            "temperature": field(F32, ">= 2^-126 (the smallest normal f32)", **DIVISOR),
            "repetition_penalty": field(F32, ">= 2^-126 (the smallest normal f32)", **DIVISOR),
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
            "ignore_eos": boolean(
                default=False,
                description="Not TGI's: keep generating past EOS (for benchmarks).",
            ),
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
        "model_dtype": string(example="bfloat16"),
        "model_device_type": string(example="cpu"),
        "model_pipeline_tag": nullable(string(example="text-generation")),
        "quantize": string(example="gguf", description="Not in TGI: the weight quantization."),
        "batch_invariant": boolean(
            description="Not in TGI: a request's tokens and logprobs are the same bits whatever "
            "else is in its batch, whatever part of its prompt came from the prefix cache and "
            "however it was chunked."
        ),
        "model_implementation": string(
            example="native",
            description="Not in TGI: the code that serves the model: native (its family's "
            "implementation) or transformers (transformers' model over the paged KV cache).",
        ),
        "kernels": string(
            example="installed avx512vnni",
            description="Not in TGI: how the CPU kernels were loaded: the variant built at "
            "install, compiled at start-up (and why), or unavailable (and what runs instead); "
            "empty on a GPU.",
        ),
        "system_fingerprint": string(
            example="fp_3f2a9c1b7d",
            description="Not in TGI: OpenAI's; changes only with the model, dtype, "
            "quantization, batch invariance or kernel build.",
        ),
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
