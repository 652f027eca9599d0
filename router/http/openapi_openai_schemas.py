"""The OpenAI component schemas of the OpenAPI document (`router/openapi.py`): chat and
completion requests, responses and stream chunks. Responses are open (OpenAI adds fields).
"""

from __future__ import annotations

from router.http.openapi_schemas import (
    U32_MAX,
    Schema,
    array,
    boolean,
    integer,
    nullable,
    number,
    obj,
    ref,
    string,
)

OPENAI_FINISH_REASONS = ["stop", "length", "stop_sequence", "tool_calls"]

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
        "ignore_eos": nullable(boolean(description="vLLM's extension: generate past EOS.")),
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
