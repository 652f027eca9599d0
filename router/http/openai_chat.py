"""`POST /v1/chat/completions` and `POST /chat_tokenize` (TGI's `chat_completions`,
`get_chat_tokenize`).

The messages (at least one) are rendered with the model's chat template (in the validation
executor, never on the event loop) and the text is generated like /generate with
`add_special_tokens=false`, through the same path (`generation.py`).
Content is a string or a list of `{"type": "text"}` parts; image parts are a 422 validation
error (the served models are text-only). `response_format` becomes a grammar, which validation
accepts or rejects like the `grammar` parameter of /generate; `tools` become one too, and the
answer a tool call (tool_calls.py). Messages with role "tool" and assistant `tool_calls` go to
the template as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from router.batching.events import EndEvent, ErrorEvent, Event, PrefillEvent, Token
from router.errors import BodyError, TemplateError, ToolError, ValidationError
from router.http.generation import Completion, GenerationStream, Options, generate
from router.http.jsonio import dumps, json_response, read_json
from router.http.native import tokenize_response
from router.http.openai_common import (
    COMMON_FIELDS,
    DONE,
    check_n,
    envelope,
    finish_reason,
    generate_parameters,
    logprob,
    openai_error,
    parse_fields,
    request_usage,
    u32_or_none,
    unix_time,
)
from router.http.responses import timing_headers
from router.http.sse import EventStream, sse_data
from router.http.state import AppState, app_state
from router.http.tool_calls import (
    ToolCall,
    ToolCallStream,
    Tools,
    parse_answer,
    parse_tools,
    tool_grammar,
    with_tools,
)
from router.validation.generate_request import GenerateParameters, GenerateRequest, Grammar
from router.validation.grammar import ANY_JSON_OBJECT
from router.validation.serde import boolean, invalid_type, optional, string

CHAT = Options(add_special_tokens=False)  # the template has the special tokens

# ---- request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    parameters: GenerateParameters
    stream: bool
    include_usage: bool
    logprobs: bool
    tools: Tools | None = None  # the functions the answer calls one of, if any


def _part(value: Any, path: str) -> str:
    """One content part: its text; an image is refused (text-only models)."""
    if not isinstance(value, dict):
        raise invalid_type(path, value, "internally tagged enum MessageChunk")
    kind = value.get("type")
    if kind == "text":
        if "text" not in value:
            raise BodyError.json_data(f"{path}: missing field `text`")
        return string(value["text"], f"{path}.text")
    if kind in ("image_url", "input_image", "image"):
        raise ValidationError("image modality is not supported")
    raise BodyError.json_data(
        f"{path}.type: unknown variant {_describe_kind(kind)}, expected `text` or `image_url`"
    )


def _describe_kind(kind: Any) -> str:
    return f"`{kind}`" if isinstance(kind, str) else "(missing or not a string)"


def _content(value: Any, path: str) -> str:
    """A string, a list of text parts (joined), or null (empty, as TGI's TextMessage)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid_type(path, value, "a string or a sequence of content parts")
    return "".join(_part(part, f"{path}[{i}]") for i, part in enumerate(value))


def _message(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise invalid_type(path, value, "struct Message")
    if "role" not in value:
        raise BodyError.json_data(f"{path}: missing field `role`")
    message = {
        "role": string(value["role"], f"{path}.role"),
        "content": _content(value.get("content"), f"{path}.content"),
    }
    for key in ("name", "tool_calls", "tool_call_id"):  # templates may use them
        if value.get(key) is not None:
            message[key] = value[key]
    return message


def _messages(value: Any, path: str) -> list[dict]:
    if not isinstance(value, list):
        raise invalid_type(path, value, "a sequence")
    if not value:
        raise ValidationError("`messages` cannot be empty")
    return [_message(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _response_format(value: Any, path: str) -> Grammar | None:
    """OpenAI's and TGI's response_format shapes -> a Grammar (None for `text`)."""
    if not isinstance(value, dict):
        raise invalid_type(path, value, "struct ResponseFormat")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object" and value.get("value") is None:  # OpenAI's JSON mode
        return Grammar(ANY_JSON_OBJECT, {"type": "object"})
    if kind == "json_schema":
        config = value.get("json_schema", value.get("value"))
        if not isinstance(config, dict) or "schema" not in config:
            raise BodyError.json_data(f"{path}.json_schema: missing field `schema`")
        return Grammar("json_schema", config)
    if kind in ("json", "json_object", "regex"):
        if value.get("value") is None:
            raise BodyError.json_data(f"{path}: missing field `value`")
        return Grammar("json" if kind == "json_object" else kind, value["value"])
    raise BodyError.json_data(
        f"{path}.type: unknown variant {_describe_kind(kind)}, expected one of `text`, "
        "`json`, `json_object`, `json_schema`, `regex`"
    )


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise invalid_type(path, value, "a sequence")
    return value


CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": _messages,
    "logprobs": optional(boolean),
    "top_logprobs": u32_or_none,
    "tools": optional(_list),
    "tool_choice": lambda value, path: value,
    "tool_prompt": optional(string),
    "response_format": optional(_response_format),
}


def parse_chat_request(body: Any) -> ChatRequest:
    """The body of /v1/chat/completions or /chat_tokenize, or a 422."""
    fields = parse_fields(body, "ChatRequest", CHAT_FIELDS, ("messages",))
    check_n(fields["n"])
    grammar = fields["response_format"]
    tools = parse_tools(fields["tools"], fields["tool_choice"], fields["tool_prompt"])
    if tools is not None:
        if grammar is not None:
            raise ToolError("Grammar and tools are mutually exclusive")
        grammar = tool_grammar(tools)
    return ChatRequest(
        messages=fields["messages"],
        parameters=generate_parameters(fields, fields["top_logprobs"], grammar),
        stream=bool(fields["stream"]),
        include_usage=bool(fields["stream_options"]),
        logprobs=bool(fields["logprobs"]),
        tools=tools,
    )


async def render(state: AppState, chat: ChatRequest) -> str:
    """The chat template applied with add_generation_prompt (and the tools), in the validation
    executor. Any failure inside the model's template is TGI's 422 `template_error`."""
    messages, variables = chat.messages, {}
    if chat.tools is not None:
        uses_tools = "tools" in (state.tokenizer.chat_template or "")
        messages, variables = with_tools(messages, chat.tools, uses_tools)
    apply = partial(
        state.tokenizer.apply_chat_template, messages, add_generation_prompt=True, **variables
    )
    try:
        return await asyncio.get_running_loop().run_in_executor(state.validation.executor, apply)
    except Exception as err:
        raise TemplateError(err) from err


# ---- response shapes ------------------------------------------------------------------------


def logprobs_json(tokens: list[Token], top_tokens: list[list[Token]]) -> dict:
    """`{"content": [{token, logprob, top_logprobs: [{token, logprob}]}]}`, one per token."""
    content = [
        {
            "token": token.text,
            "logprob": logprob(token),
            "top_logprobs": [{"token": t.text, "logprob": logprob(t)} for t in top],
        }
        for token, top in zip(tokens, top_tokens)
    ]
    return {"content": content}


def message_content(done: Completion) -> str:
    """The answer: the generated text, cut before the stop sequence when one ended it."""
    end = done.result.end
    return done.result.content if end.finish_reason == "stop_sequence" else end.generated_text


def completion_json(state: AppState, chat: ChatRequest, done: Completion) -> dict:
    result = done.result
    message = {"role": "assistant", "content": message_content(done)}
    reason = finish_reason(result.end)
    if chat.tools is not None:
        answer = parse_answer(message["content"])
        if isinstance(answer, ToolCall):
            message = {"role": "assistant", "content": None, "tool_calls": [call_json(answer)]}
            reason = "tool_calls"
        elif answer is not None:  # no_tool: a plain answer (None: cut short, the text as is)
            message["content"] = answer
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs_json(result.tokens, result.top_tokens) if chat.logprobs else None,
        "finish_reason": reason,
    }
    usage = request_usage(done.request, result.end)
    return envelope(state, "chat.completion", unix_time(), [choice], usage)


def call_json(call: ToolCall) -> dict:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def tool_chunks(
    state: AppState, chat: ChatRequest, created: int, event: Event, calls: ToolCallStream
) -> list[dict]:
    """The chunks a token of a tool-call answer releases: tool_calls deltas (none until the
    function's name is known), and at the end the rest with finish_reason "tool_calls", or a
    `no_tool` answer's content."""
    end = event if isinstance(event, EndEvent) else None
    deltas, content = calls.feed(event.content), None
    if end is not None:
        rest, content = calls.finish()
        deltas += rest
    if not deltas and end is None:
        return []
    reason = None
    if end is not None:
        called = calls.name is not None and content is None
        reason = "tool_calls" if called and end.finish_reason != "length" else finish_reason(end)
    delta = {"role": "assistant", "content": content, "tool_calls": deltas or None}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return [envelope(state, "chat.completion.chunk", created, [choice], None)]


def chunk_json(
    state: AppState, chat: ChatRequest, created: int, event: Event, end: EndEvent | None
) -> dict:
    """One chat.completion.chunk: the text the token released as delta (`tool_calls: null`
    keeps the text-generation client's parser happy), finish_reason on the last one."""
    delta = {"role": "assistant", "content": event.content, "tool_calls": None}
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": logprobs_json([event.token], [event.top_tokens]) if chat.logprobs else None,
        "finish_reason": finish_reason(end) if end is not None else None,
    }
    return envelope(state, "chat.completion.chunk", created, [choice], None)


# ---- handlers -------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await chat(request, await read_json(request))


async def chat(request: web.Request, body: Any) -> web.StreamResponse:
    """A chat request's body -> its answer (also reached through /invocations)."""
    state = app_state(request)
    parsed = parse_chat_request(body)
    inputs = await render(state, parsed)  # a template error is an HTTP 422, even streamed
    generate_request = GenerateRequest(inputs, parsed.parameters)
    if parsed.stream:
        return await _stream(request, state, parsed, generate_request)
    done = await generate(state, generate_request, CHAT)
    headers = timing_headers(done.request, done.result.end, done.timings, state.config.compute_type)
    return json_response(completion_json(state, parsed, done), headers=headers)


async def _stream(
    request: web.Request, state: AppState, chat: ChatRequest, generate_request: GenerateRequest
) -> web.StreamResponse:
    """SSE chunks then `data: [DONE]`; overload, validation and generation errors in-band."""
    generation = GenerationStream(state, generate_request, CHAT)
    sse = await EventStream.open(
        request, state.config.stream_write_timeout, state.config.compute_type
    )
    created = unix_time()
    calls = ToolCallStream() if chat.tools is not None else None

    def render(event: Event) -> Iterable[bytes]:
        if isinstance(event, PrefillEvent):
            return ()
        if isinstance(event, ErrorEvent):
            return (openai_error(event.error),)
        end = event if isinstance(event, EndEvent) else None
        if calls is not None:
            out = [sse_data(c) for c in tool_chunks(state, chat, created, event, calls)]
        else:
            out = [sse_data(chunk_json(state, chat, created, event, end))]
        if end is not None and chat.include_usage:
            usage = request_usage(generation.validated, end)
            out.append(sse_data(envelope(state, "chat.completion.chunk", created, [], usage)))
        return out

    if await sse.send(generation.events(), render):
        await sse.write_last(DONE)
    return sse.response


async def chat_tokenize(request: web.Request) -> web.Response:
    """The templated text and its tokens, `{"tokenize_response": [...], "templated_text"}`."""
    state = app_state(request)
    chat = parse_chat_request(await read_json(request))
    text = await render(state, chat)
    pieces = await tokenize_response(state, text, add_special_tokens=False)
    body = f'{{"tokenize_response":{pieces.text},"templated_text":{dumps(text)}}}'
    return web.Response(text=body, content_type="application/json")
