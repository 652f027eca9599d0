"""A request's grammar (TGI's `parameters.grammar`, OpenAI's `response_format`) checked as TGI
checks it (`router/src/validation.rs`, with its texts) and compiled once with llguidance, so
that a grammar the shards could not follow is a 422 before the request is queued, never a
failed batch.

TGI's rules: a `json`/`json_schema` value may be an object or a string holding one; it must be a
valid JSON Schema (draft 2020-12) with a `properties` key. OpenAI's JSON mode (`json_object`
without a schema) is any JSON object, so the `properties` rule does not apply to it. Where TGI
then compiles the schema to a regex, we send the schema itself: llguidance follows it as a
grammar (recursion, `anyOf`, `$ref`), which a regex cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema

from common.grammar import GRAMMAR_JSON, GRAMMAR_REGEX, MAX_GRAMMAR_BYTES, GrammarError, validate
from router.errors import ValidationError
from router.validation.generate_request import Grammar

ANY_JSON_OBJECT = "json_object"  # Grammar.type of OpenAI's JSON mode (router/http/openai_chat.py)


@dataclass(frozen=True)
class ValidGrammar:
    type: int  # GRAMMAR_JSON or GRAMMAR_REGEX, as the proto's grammar_type
    value: str  # the JSON schema, serialized, or the regex


def check_grammar(grammar: Grammar) -> ValidGrammar:
    """`grammar` as the shards take it, or a ValidationError. Checking a schema and compiling
    take milliseconds (~3 ms for a small schema, most of it the meta-schema): call it off the
    event loop. Applications send the same grammars again and again, so results are cached."""
    if grammar.type == "regex":
        return _checked(GRAMMAR_REGEX, grammar.value, False)
    value = grammar.value["schema"] if grammar.type == "json_schema" else grammar.value
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    return _checked(GRAMMAR_JSON, value, grammar.type != ANY_JSON_OBJECT)


@lru_cache(maxsize=256)
def _checked(kind: int, value: str, needs_properties: bool) -> ValidGrammar:
    """ValidationErrors are not cached (lru_cache keeps results only)."""
    if kind == GRAMMAR_REGEX:
        valid = ValidGrammar(GRAMMAR_REGEX, value)
    else:
        schema = _schema(value, needs_properties)
        valid = ValidGrammar(GRAMMAR_JSON, json.dumps(schema, ensure_ascii=False))
    size = len(valid.value.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise _invalid(f"it is {size} bytes, more than the limit of {MAX_GRAMMAR_BYTES}")
    try:
        validate(valid.type, valid.value)
    except GrammarError as err:
        raise _invalid(str(err)) from err
    return valid


def _schema(text: str, needs_properties: bool) -> dict:
    try:  # a schema given as a string must hold one, as TGI parses it again
        value: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid(str(err)) from err
    if not isinstance(value, dict):
        raise ValidationError("grammar is not supported")
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as err:
        raise _invalid(err.message) from err
    if needs_properties and "properties" not in value:
        raise _invalid("Grammar must have a 'properties' field")
    return value


def _invalid(reason: str) -> ValidationError:
    return ValidationError(f"grammar is not valid: {reason}")
