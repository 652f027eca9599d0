"""Structured output on the default model through the real clients, unmodified: TGI's `grammar`
(huggingface_hub's text_generation) and OpenAI's `response_format` (the `openai` package, sync
and async, streamed and not; huggingface_hub's chat_completion). Every answer that ends on its
own parses and validates against its schema; one cut by max_tokens says so."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "address": {  # nested objects, a string pattern
        "type": "object",
        "properties": {
            "street": NAME,
            "city": {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        },
        "required": ["street", "city", "zip"],
    },
    "shopping": {  # an array with bounds
        "type": "object",
        "properties": {"items": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["items"],
    },
    "color": {  # an enum
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "weather": {  # numbers with bounds
        "type": "object",
        "properties": {
            "celsius": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["celsius", "humidity"],
    },
    "book": {  # required and optional fields
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "year": {"type": "integer"}},
        "required": ["title"],
        "additionalProperties": False,
    },
    "task": {  # booleans and integers
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0}},
        "required": ["done", "count"],
    },
    "flight": {  # a string pattern
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
        "required": ["code"],
    },
    "order": {  # an array of objects
        "type": "object",
        "properties": {
            "lines": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": NAME,
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["lines"],
    },
    "ticket": {  # an array of enums, a bounded integer
        "type": "object",
        "properties": {
            "labels": {"type": "array", "items": {"enum": ["bug", "docs", "ui"]}, "maxItems": 3},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["labels", "priority"],
    },
}


def closed(schema):
    """Every object of `schema` without extra properties, as OpenAI's strict mode requires
    (an open object lets a small model append keys until max_tokens)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [closed(value) for value in schema]
    return schema


SCHEMAS = {name: closed(schema) for name, schema in SCHEMAS.items()}
PROMPTS = [
    "Answer in JSON: describe a {name}.",
    "Give one example {name} as a JSON object.",
]
MAX_TOKENS = 160


def check(schema: dict, text: str, finish_reason: str, stopped: str = "stop") -> bool:
    """An answer that ended on its own validates; one cut short says "length". True if whole."""
    if finish_reason == "length":
        return False
    assert finish_reason == stopped, (finish_reason, text)
    jsonschema.validate(json.loads(text), schema)
    return True


def openai_clients(launcher):
    import openai

    url = f"{launcher.url}/v1"
    return (
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0),
        openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0),
    )


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def messages(prompt: str, name: str) -> list[dict]:
    return [{"role": "user", "content": prompt.format(name=name)}]


def test_openai_response_format_for_ten_schemas(launcher):
    """Every schema and prompt, non-streamed with the async client, all at once."""
    _, client = openai_clients(launcher)

    async def ask(name: str, prompt: str):
        out = await client.chat.completions.create(
            model="tgi", messages=messages(prompt, name), max_tokens=MAX_TOKENS, temperature=0,
            response_format=json_schema_format(name),
        )  # fmt: skip
        choice = out.choices[0]
        return check(SCHEMAS[name], choice.message.content, choice.finish_reason)

    async def all_answers():
        return await asyncio.gather(*[ask(n, p) for n in SCHEMAS for p in PROMPTS])

    whole = asyncio.run(all_answers())
    assert sum(whole) >= 0.9 * len(whole)  # closed schemas end well before max_tokens


def test_openai_streamed_and_json_mode(launcher):
    client, _ = openai_clients(launcher)
    for name in ("order", "weather"):
        stream = client.chat.completions.create(
            model="tgi", messages=messages(PROMPTS[0], name), max_tokens=MAX_TOKENS,
            temperature=0, response_format=json_schema_format(name), stream=True,
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert check(SCHEMAS[name], text, finish)
    out = client.chat.completions.create(
        model="tgi", messages=messages(PROMPTS[1], "cat"), max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    check({"type": "object"}, out.choices[0].message.content, out.choices[0].finish_reason)


def test_answers_cut_by_max_tokens_say_length(launcher):
    client, _ = openai_clients(launcher)
    out = client.chat.completions.create(
        model="tgi", messages=messages(PROMPTS[0], "order"), max_tokens=5, temperature=0,
        response_format=json_schema_format("order"),
    )  # fmt: skip
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content.startswith("{")


def test_huggingface_hub_grammar_and_response_format(launcher):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=launcher.url)
    for name in ("person", "flight", "ticket"):
        out = client.text_generation(
            f"A {name} as JSON: ", max_new_tokens=MAX_TOKENS, details=True,
            return_full_text=False, grammar={"type": "json", "value": SCHEMAS[name]},
        )  # fmt: skip
        check(SCHEMAS[name], out.generated_text, out.details.finish_reason, "eos_token")
    out = client.text_generation(
        "My phone number is ",
        max_new_tokens=20,
        return_full_text=False,
        grammar={"type": "regex", "value": r"\d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\d{3}-\d{4}", out)
    chat = client.chat_completion(
        messages(PROMPTS[1], "book"), max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json", "value": SCHEMAS["book"]},
    )  # fmt: skip
    check(SCHEMAS["book"], chat.choices[0].message.content, chat.choices[0].finish_reason)


def test_bad_grammars_are_422(launcher):
    import requests

    for grammar, detail in [
        ({"type": "regex", "value": "a(b"}, "grammar is not valid"),
        ({"type": "json", "value": {"type": "object"}}, "'properties'"),
    ]:
        r = requests.post(
            f"{launcher.url}/generate", json={"inputs": "x", "parameters": {"grammar": grammar}}
        )
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        assert detail in r.json()["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_mixed_batch_keeps_unconstrained_requests_free(launcher, stream):
    """A constrained and a free request at once: the free one still answers in prose."""
    _, client = openai_clients(launcher)

    async def both():
        constrained = client.chat.completions.create(
            model="tgi", messages=messages(PROMPTS[0], "color"), max_tokens=40, temperature=0,
            response_format=json_schema_format("color"),
        )  # fmt: skip
        free = client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
            temperature=0,
        )  # fmt: skip
        return await asyncio.gather(constrained, free)

    constrained, free = asyncio.run(both())
    assert json.loads(constrained.choices[0].message.content)["color"] in ("red", "green", "blue")
    assert not free.choices[0].message.content.lstrip().startswith("{")
