"""The OpenAPI document (router/http/openapi.py) is a valid OpenAPI 3.1 document, it lists every
route of the app, and real responses of a whole router app over the fake shard validate against
it: status, content type, headers, JSON body, and each server-sent event. A deliberately wrong
response fails, so these tests can fail."""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from router import VERSION
from router.batching.shard_client import Generation
from router.http.app import make_app
from router.http.openapi import openapi_document
from router.text.tokenizer import Tokenizer
from tests.router.app_harness import BLOCK_SIZE, RouterApp
from tests.router.fake_shard import FakeShardClient

DOCUMENT = openapi_document(VERSION)
OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/chat_tokenize"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# ------------------------------------------------------------------------------------------------
# Checking a response against the document


class ResponseMismatch(AssertionError):
    """A response the document does not describe."""


class Checker:
    """Validates responses (and request bodies) against an OpenAPI 3.1 document with jsonschema.

    Schemas are validated as JSON Schema 2020-12 (OpenAPI 3.1's dialect); `#/components/...`
    references resolve because the components are attached to each root schema."""

    def __init__(self, document: dict):
        self.document = document

    def validate(self, value: Any, schema: dict, where: str) -> None:
        root = {**schema, "components": self.document["components"]}
        errors = sorted(Draft202012Validator(root).iter_errors(value), key=lambda e: e.path)
        if errors:
            best = errors[0]
            at = "/".join(map(str, best.absolute_path))
            raise ResponseMismatch(f"{where}: at /{at}: {best.message}")

    def operation(self, method: str, path: str) -> dict:
        try:
            return self.document["paths"][path][method.lower()]
        except KeyError:
            raise ResponseMismatch(f"{method} {path} is not documented") from None

    def request_is_valid(self, method: str, path: str, body: Any) -> bool:
        schema = self.operation(method, path)["requestBody"]["content"]["application/json"]
        try:
            self.validate(body, schema["schema"], f"{method} {path} request")
        except ResponseMismatch:
            return False
        return True

    def check(
        self, method: str, path: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> Any:
        """The parsed body (JSON value, list of SSE events or text) if the response matches."""
        where = f"{method} {path} -> {status}"
        spec = self.operation(method, path)["responses"].get(str(status))
        if spec is None:
            raise ResponseMismatch(f"{where}: status not documented")
        self.check_headers(spec.get("headers", {}), headers, where)
        content = spec.get("content")
        if not content:
            if body:
                raise ResponseMismatch(f"{where}: documented without a body, got {body[:80]!r}")
            return None
        media_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type not in content:
            raise ResponseMismatch(f"{where}: content type {media_type!r} not in {list(content)}")
        return self.check_body(content[media_type], media_type, body, f"{where} {media_type}")

    def check_headers(self, specs: dict, headers: Mapping[str, str], where: str) -> None:
        for name, spec in specs.items():
            value = headers.get(name)
            if value is None:
                if spec.get("required"):
                    raise ResponseMismatch(f"{where}: missing header {name}")
                continue
            self.validate(value, spec["schema"], f"{where} header {name}")

    def check_body(self, media: dict, media_type: str, body: bytes, where: str) -> Any:
        if media_type == "text/event-stream":
            events = parse_sse(body, media.get("x-sse-terminator"), where)
            for i, event in enumerate(events):
                self.validate(event, media["schema"], f"{where} event {i}")
            return events
        if media_type == "application/json":
            try:
                value = json.loads(body)
            except ValueError as e:
                raise ResponseMismatch(f"{where}: not JSON: {e}") from None
        else:
            value = body.decode("utf-8")
        self.validate(value, media["schema"], where)
        return value


def parse_sse(body: bytes, terminator: str | None, where: str) -> list:
    """The JSON of each `data:` line. Only `data: ` lines and `:` comments are allowed; an error
    event ends the stream; `terminator` (e.g. [DONE]) must close it when given, else never."""
    text = body.decode("utf-8")
    if text and not text.endswith("\n\n"):
        raise ResponseMismatch(f"{where}: the stream does not end with a blank line")
    payloads = []
    for block in text.split("\n\n")[:-1]:
        for line in block.split("\n"):
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
            elif not line.startswith(":"):
                raise ResponseMismatch(f"{where}: unexpected SSE line {line!r}")
    if terminator is not None:
        if not payloads or payloads.pop() != terminator:
            raise ResponseMismatch(f"{where}: the stream does not end with {terminator}")
    events = []
    for payload in payloads:
        try:
            events.append(json.loads(payload))
        except ValueError:
            raise ResponseMismatch(f"{where}: event is not JSON: {payload[:80]!r}") from None
    if any("error" in event for event in events[:-1]):
        raise ResponseMismatch(f"{where}: an event follows an error event")
    return events


CHECKER = Checker(DOCUMENT)


# ------------------------------------------------------------------------------------------------
# The app under test


class RichFakeShard(FakeShardClient):
    """The fake shard, plus prompt logprobs and top tokens when a request asks for them (as the
    real shard sends them), so that every optional part of a response is exercised."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts_sent: set[int] = set()

    def generation(self, state: dict) -> Generation:
        g = super().generation(state)
        r = self.requests[g.request_id]
        n = min(r.top_n_tokens, len(self.vocab))
        g = replace(g, top_tokens=tuple((i, -1.0) for i in self.vocab[:n]))
        if r.prefill_logprobs and r.id not in self.prompts_sent:
            self.prompts_sent.add(r.id)
            logprobs = [math.nan] + [-2.0] * (len(r.input_ids) - 1)
            g = replace(g, prefill=tuple(zip(r.input_ids, logprobs)))
        return g


class DocumentedRouterApp(RouterApp):
    def __init__(self, tokenizer, num_blocks: int = 512, **config_overrides):
        super().__init__(tokenizer, num_blocks, **config_overrides)
        rich = RichFakeShard(self.shard.vocab, block_size=BLOCK_SIZE, num_blocks=num_blocks)
        self.shard = self.batcher.client = self.state.health.client = rich

    async def __aenter__(self) -> DocumentedRouterApp:
        self.task = asyncio.create_task(self.batcher.run())
        self.app = make_app(self.state)
        self.client = TestClient(TestServer(self.app))
        await self.client.start_server()
        return self

    async def call(self, method: str, path: str, **kwargs) -> tuple[int, Any]:
        """Sends a request; checks the response against the document; (status, parsed body).
        A request the server accepted (200, no error event) must be valid for the document."""
        response = await self.client.request(method, path, **kwargs)
        body = await response.read()
        parsed = CHECKER.check(method, path, response.status, response.headers, body)
        if "json" in kwargs and response.status == 200 and not has_error_event(parsed):
            assert CHECKER.request_is_valid(method, path, kwargs["json"]), kwargs["json"]
        return response.status, parsed


def has_error_event(parsed: Any) -> bool:
    return isinstance(parsed, list) and any(isinstance(e, dict) and "error" in e for e in parsed)


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """The API's routes (Swagger UI's static files under /docs/static/ are none)."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method in ("GET", "POST") and not isinstance(route.resource, web.StaticResource)
    }


# ------------------------------------------------------------------------------------------------
# The document itself


def test_document_is_valid_openapi():
    validate_spec(copy.deepcopy(DOCUMENT))
    assert json.loads(json.dumps(DOCUMENT)) == DOCUMENT
    assert DOCUMENT["info"]["version"] == VERSION
    names = {
        "GenerateRequest", "GenerateParameters", "GenerateResponse", "Details", "BestOfSequence",
        "Token", "PrefillToken", "StreamResponse", "StreamDetails", "ErrorResponse", "Info",
        "SimpleToken", "ChatRequest", "ChatCompletion", "ChatCompletionChunk",
        "CompletionRequest", "Completion", "CompletionChunk", "ModelsList", "ChatTokenizeResponse",
    }  # fmt: skip
    assert names <= set(DOCUMENT["components"]["schemas"])


def test_every_route_is_documented_and_every_documented_route_exists(tokenizer):
    app = make_app(RouterApp(tokenizer).state)
    documented = {(m.upper(), p) for p, ops in DOCUMENT["paths"].items() for m in ops}
    served = routes_of(app)
    assert served - documented == set()
    assert documented - served == set()
    assert {("POST", p) for p in OPENAI_PATHS - {"/v1/models"}} <= served


def test_every_generate_parameter_is_described():
    from dataclasses import fields

    from router.validation.generate_request import GenerateParameters

    described = set(DOCUMENT["components"]["schemas"]["GenerateParameters"]["properties"])
    assert {f.name for f in fields(GenerateParameters)} == described


# ------------------------------------------------------------------------------------------------
# Real responses


GENERATE_BODIES = [
    {"inputs": "Hello"},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}},
    {
        "inputs": "Hello world",
        "parameters": {
            "max_new_tokens": 4,
            "details": True,
            "decoder_input_details": True,
            "top_n_tokens": 2,
            "return_full_text": True,
        },
    },
    {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 2**64 - 1}},
    {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "best_of": 2, "do_sample": True}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "stop": [" quick"], "details": True}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "temperature": None, "seed": None}},
]


def test_generate_responses_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer, enable_prefill_logprobs=True) as app:
            for body in GENERATE_BODIES:
                status, out = await app.call("POST", "/generate", json=body)
                assert status == 200, out
                status, out = await app.call("POST", "/", json=body)
                assert status == 200 and len(out) == 1, out
            status, out = await app.call("POST", "/generate", json=GENERATE_BODIES[3])
            assert len(out["details"]["top_tokens"][0]) == 2  # the optional parts were there
            assert out["details"]["prefill"][0]["logprob"] is None

    run(main())


STREAM_BODIES = [
    {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 2}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "do_sample": True, "details": True}},
    {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "stop": [" quick"], "details": True}},
    {"inputs": "Hello", "parameters": {"temperature": 0}},  # in-band validation error
]


def test_stream_responses_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            for body in STREAM_BODIES:
                status, events = await app.call("POST", "/generate_stream", json=body)
                assert status == 200 and events, events
                status, events = await app.call("POST", "/", json={**body, "stream": True})
                assert status == 200 and events, events
            assert events[-1]["error_type"] == "validation"
            status, events = await app.call("POST", "/generate_stream", json=STREAM_BODIES[1])
            assert len(events[0]["top_tokens"]) == 2 and events[-1]["details"]["input_length"]

    run(main())


def test_tokenize_info_health_metrics_and_docs_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            status, tokens = await app.call("POST", "/tokenize", json={"inputs": "Hello world"})
            assert status == 200 and tokens[0]["start"] == 0
            status, info = await app.call("GET", "/info")
            assert status == 200 and info["version"] == VERSION
            for path in ("/", "/health", "/ping"):
                assert (await app.call("GET", path))[0] == 200
            status, text = await app.call("GET", "/metrics")
            assert status == 200 and "tgi_request_count" in text
            status, document = await app.call("GET", "/api-doc/openapi.json")
            assert status == 200 and document == DOCUMENT
            status, html = await app.call("GET", "/docs")
            assert status == 200 and "swagger-ui" in html and "api-doc/openapi.json" in html
            assert "http://" not in html and "https://" not in html  # works offline
            for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
                assert f"docs/static/{name}" in html
                response = await app.client.get(f"/docs/static/{name}")  # files, not the API
                assert response.status == 200 and len(await response.read()) > 10_000

    run(main())


ERROR_PATHS = ["/generate", "/generate_stream", "/", "/tokenize"]
JSON = {"Content-Type": "application/json"}
EVENT = "event"  # HTTP 200, then an error event
BAD_JSON = {"data": b'{"inputs": "Hello"', "headers": JSON}
NOT_JSON = {"data": b'{"inputs": "Hello"}', "headers": {"Content-Type": "text/plain"}}
BEST_OF_3 = {"inputs": "x", "parameters": {"best_of": 3, "do_sample": True}}
BODY_ERRORS = [  # request, and its status on each of ERROR_PATHS
    (BAD_JSON, (400, 400, 400, 400)),
    (NOT_JSON, (415, 415, 415, 415)),
    ({"json": {"inputs": 3}}, (422, 422, 422, 422)),
    ({"json": {"parameters": {}}}, (422, 422, 422, 422)),
    ({"json": {"inputs": "Hello", "parameters": {"max_new_tokens": -1}}}, (422, 422, 422, 422)),
    ({"json": {"inputs": "Hello", "parameters": {"temperature": 0}}}, (422, EVENT, 422, 200)),
    ({"json": {"inputs": ""}}, (422, EVENT, 422, 422)),
    ({"json": BEST_OF_3}, (422, 422, 422, 200)),
    ({"json": {"inputs": "x" * 3000}}, (413, 413, 413, 413)),
]


@pytest.mark.parametrize("path", ERROR_PATHS)
def test_error_responses_validate(tokenizer, path):
    async def main():
        async with DocumentedRouterApp(tokenizer, payload_limit=2000) as app:
            for kwargs, statuses in BODY_ERRORS:
                expected = statuses[ERROR_PATHS.index(path)]
                status, out = await app.call("POST", path, **kwargs)
                if expected == EVENT:
                    assert status == 200 and out[-1]["error_type"] == "validation", out
                else:
                    assert status == expected, (kwargs, out)

    run(main())


def test_overload_generation_error_and_unhealthy_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer, max_concurrent_requests=1) as app:
            app.shard.step_delay = 0.05
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
            first = asyncio.create_task(app.call("POST", "/generate", json=body))
            await asyncio.sleep(0.02)
            assert (await app.call("POST", "/generate", json=body))[0] == 429
            status, events = await app.call("POST", "/generate_stream", json=body)
            assert status == 200 and events[-1]["error_type"] == "overloaded"
            assert (await first)[0] == 200
            app.shard.step_delay = 0.0
            app.shard.fail_next = "prefill"
            status, out = await app.call("POST", "/generate", json=body)
            assert status == 424 and out["error_type"] == "generation"
            app.shard.fail_next = "prefill"
            status, out = await app.call("GET", "/health")
            assert status == 503 and out["error_type"] == "healthcheck"
            app.shard.fail_next = "decode"
            status, events = await app.call("POST", "/generate_stream", json=body)
            assert status == 200 and events[-1]["error_type"] == "generation"

    run(main())


EDGE_PARAMETERS = {
    "temperature": [0, 2**-150, 2**-149, 1e-46, 1e-45, -1.0, 3.5e38, 1e-40, 1e-38]
    + [2**-126, 2**-126 - 2**-150, 2**-126 - 2**-149, 2**-126 - 2**-151],
    "repetition_penalty": [0, 2**-150, 1e-45, 1.2, 1e-40, 2**-126, 2**-126 - 2**-149],
    "frequency_penalty": [2, 2 + 2**-23, 2 + 2**-22, 2.0000002, -2 - 2**-23, -2 - 2**-22],
    "top_p": [0, 2**-150, 0.5, 1 - 2**-24, 1 - 2**-25, 0.9999999701, 1.0],
    "typical_p": [2**-149, 1 - 2**-25, 0.99999997],
    "top_k": [-1, 0, 1],
    "max_new_tokens": [0, 1],
    "truncate": [0, 1],
}


def test_parameter_bounds_are_exactly_what_validation_accepts(tokenizer):
    """Around each static bound, the schema accepts a value exactly when /generate does."""

    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            for name, values in EDGE_PARAMETERS.items():
                for value in values:
                    parameters = {"max_new_tokens": 1, name: value}
                    body = {"inputs": "Hello", "parameters": parameters}
                    status, out = await app.call("POST", "/generate", json=body)
                    valid = CHECKER.request_is_valid("POST", "/generate", body)
                    assert (status == 200) == valid, (name, value, status, out)

    run(main())


def test_unauthorized_validates(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer, api_key="secret") as app:
            for path in ("/generate", "/generate_stream", "/", "/tokenize"):
                status, out = await app.call("POST", path, json={"inputs": "Hello"})
                assert status == 401 and out is None

    run(main())


# ------------------------------------------------------------------------------------------------
# OpenAI routes

CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
CHAT_BODIES = [
    CHAT,
    {**CHAT, "logprobs": True, "top_logprobs": 2, "temperature": 0},
    {**CHAT, "seed": 1, "temperature": 0.7, "stop": "quick", "name": None, "tools": None},
]
COMPLETION_BODIES = [
    {"model": "tgi", "prompt": "Hello", "max_tokens": 3},
    {"model": "tgi", "prompt": ["Hello", "Hi"], "max_tokens": 2, "seed": 3},
]


def test_openai_responses_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            for body in CHAT_BODIES:
                status, out = await app.call("POST", "/v1/chat/completions", json=body)
                assert status == 200 and out["object"] == "chat.completion", out
                stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
                status, events = await app.call("POST", "/v1/chat/completions", json=stream)
                assert status == 200 and events[-1]["usage"] is not None, events
            for body in COMPLETION_BODIES:
                status, out = await app.call("POST", "/v1/completions", json=body)
                assert status == 200 and out["object"] == "text_completion", out
                status, events = await app.call(
                    "POST", "/v1/completions", json={**body, "stream": True}
                )
                assert status == 200 and events, events
            status, models = await app.call("GET", "/v1/models")
            assert status == 200 and models["data"][0]["id"] == app.config.model_id
            status, out = await app.call("POST", "/chat_tokenize", json=CHAT)
            assert status == 200 and out["tokenize_response"], out

    run(main())


def test_openai_errors_validate(tokenizer):
    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            suffix = {"prompt": "Hello", "suffix": "!", "max_tokens": 2}
            assert (await app.call("POST", "/v1/completions", json=suffix))[0] == 422
            for path in ("/v1/chat/completions", "/v1/completions", "/chat_tokenize"):
                assert (await app.call("POST", path, json={"messages": 3, "prompt": 3}))[0] == 422
                assert (await app.call("POST", path, data=b"{", headers=JSON))[0] == 400

    run(main())


def tgi_openai_samples() -> list[tuple[str, Any]]:
    """OpenAI-route bodies shaped as TGI sends them (schema name, body)."""
    frame = {"id": "", "created": 1706270835, "model": "tgi", "system_fingerprint": "3.3.6-native"}
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    message = {"role": "assistant", "content": "Hi there"}
    delta = {"role": "assistant", "content": " the", "tool_calls": None}
    logprobs = {"content": [{"token": " the", "logprob": -0.5, "top_logprobs": []}]}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    chunk_choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
    text_choice = {"index": 0, "text": " the", "logprobs": None, "finish_reason": "length"}
    error = {"error": {"message": "Input validation error: x", "http_status_code": 422}}
    model = {"id": "tgi", "object": "model", "created": 0, "owned_by": "tgi"}
    chat = {"object": "chat.completion", **frame, "choices": [choice], "usage": usage}
    chunk = {"object": "chat.completion.chunk", **frame, "choices": [chunk_choice]}
    completion = {"object": "text_completion", **frame, "choices": [text_choice]}
    return [
        ("ChatCompletion", chat),
        ("ChatStreamEvent", {**chunk, "usage": None}),
        ("ChatStreamEvent", {**chunk, "choices": [], "usage": usage}),
        ("ChatStreamEvent", error),
        ("Completion", {**completion, "usage": usage}),
        (
            "CompletionStreamEvent",
            {**completion, "choices": [{**text_choice, "finish_reason": ""}]},
        ),
        ("CompletionStreamEvent", error),
        ("ModelsList", {"object": "list", "data": [model]}),
        ("ChatTokenizeResponse", {"tokenize_response": [], "templated_text": "<|im_start|>"}),
    ]


def test_openai_schemas_accept_tgi_shapes_and_reject_wrong_ones():
    for name, body in tgi_openai_samples():
        CHECKER.validate(body, ref_to(name), name)
    chat = tgi_openai_samples()[0][1]
    wrong = [
        {k: v for k, v in chat.items() if k != "usage"},
        {**chat, "object": "chat.completion.chunk"},
        {**chat, "choices": [{**chat["choices"][0], "finish_reason": "eos_token"}]},
        {**chat, "choices": [{k: v for k, v in chat["choices"][0].items() if k != "logprobs"}]},
    ]
    for body in wrong:
        with pytest.raises(ResponseMismatch):
            CHECKER.validate(body, ref_to("ChatCompletion"), "wrong chat.completion")


def ref_to(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


# ------------------------------------------------------------------------------------------------
# The checker fails wrong responses


def real_responses(tokenizer) -> dict[str, tuple[int, dict, bytes]]:
    """A few raw responses of the real app: name -> (status, headers, body)."""

    async def main():
        async with DocumentedRouterApp(tokenizer) as app:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": True}}
            out = {}
            for name, method, path, kwargs in [
                ("generate", "POST", "/generate", {"json": body}),
                ("stream", "POST", "/generate_stream", {"json": body}),
                ("health", "GET", "/health", {}),
            ]:
                response = await app.client.request(method, path, **kwargs)
                out[name] = (response.status, dict(response.headers), await response.read())
            return out

    return run(main())


def mutate_json(body: bytes, change) -> bytes:
    value = json.loads(body)
    change(value)
    return json.dumps(value).encode()


def test_checker_rejects_wrong_responses(tokenizer):
    responses = real_responses(tokenizer)
    status, headers, body = responses["generate"]
    CHECKER.check("POST", "/generate", status, headers, body)  # the real one passes
    wrong_bodies = [
        lambda v: v.pop("generated_text"),
        lambda v: v["details"].pop("tokens"),
        lambda v: v["details"].update(seed="42"),
        lambda v: v["details"].update(finish_reason="stop"),
        lambda v: v["details"]["tokens"][0].update(extra=1),
        lambda v: v["details"]["tokens"][0].pop("special"),
        lambda v: v["details"].update(top_tokens=[[{"id": 1}]]),
        lambda v: v.update(details=None),
    ]
    for change in wrong_bodies:
        with pytest.raises(ResponseMismatch):
            CHECKER.check("POST", "/generate", status, headers, mutate_json(body, change))
    with pytest.raises(ResponseMismatch, match="status not documented"):
        CHECKER.check("POST", "/generate", 418, headers, body)
    with pytest.raises(ResponseMismatch, match="content type"):
        CHECKER.check("POST", "/generate", 200, {**headers, "Content-Type": "text/plain"}, body)
    without_header = {k: v for k, v in headers.items() if k.lower() != "x-compute-type"}
    with pytest.raises(ResponseMismatch, match="missing header"):
        CHECKER.check("POST", "/generate", 200, without_header, body)
    with pytest.raises(ResponseMismatch, match="not documented"):
        CHECKER.check("POST", "/nowhere", 200, headers, body)


def test_checker_rejects_wrong_streams_and_bodies(tokenizer):
    responses = real_responses(tokenizer)
    status, headers, body = responses["stream"]
    CHECKER.check("POST", "/generate_stream", status, headers, body)
    wrong_streams = [
        body + b"data: [DONE]\n\n",
        body.replace(b'"index":1', b'"index":0'),
        body.replace(b'"generated_text":null', b'"generated_text":1', 1),
        body.replace(b',"details":null', b"", 1),
        b"event: token\n" + body,
        body.rstrip(b"\n"),
        b'data: {"error":"x","error_type":"validation"}\n\n' + body,
    ]
    for wrong in wrong_streams:
        with pytest.raises(ResponseMismatch):
            CHECKER.check("POST", "/generate_stream", status, headers, wrong)
    chat_stream = b'data: {"object":"chat.completion.chunk"}\n\n'
    with pytest.raises(ResponseMismatch):
        CHECKER.check(
            "POST", "/v1/chat/completions", 200, {"Content-Type": "text/event-stream"}, chat_stream
        )
    status, headers, body = responses["health"]
    CHECKER.check("GET", "/health", status, headers, body)
    with pytest.raises(ResponseMismatch, match="without a body"):
        CHECKER.check("GET", "/health", status, headers, b"ok")
