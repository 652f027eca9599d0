"""What the router and the shards share about grammars: the proto's grammar types, how one
becomes an llguidance grammar, and the limits every grammar is held to (the router validates
with them, so whatever it queues compiles in the shards)."""

from __future__ import annotations

import llguidance

GRAMMAR_NONE, GRAMMAR_JSON, GRAMMAR_REGEX = 0, 1, 2  # the proto's GrammarType
MAX_GRAMMAR_BYTES = 64 * 1024  # a JSON schema (serialized) or a regex
# JSON as json.dumps writes it, on one line: free whitespace would let a model wander in blanks
# until max_new_tokens. A schema's own "x-guidance" options come on top.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that does not compile."""


def parser_limits() -> llguidance.LLParserLimits:
    """What one grammar may cost: llguidance's defaults, which bound the grammar's size, the
    lexer's states and the work of one step."""
    return llguidance.LLParserLimits()


def grammar_text(kind: int, value: str) -> str:
    """The llguidance grammar of a proto grammar (kind GRAMMAR_JSON: a schema; GRAMMAR_REGEX)."""
    if kind == GRAMMAR_JSON:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        except ValueError as err:
            raise GrammarError(f"not a JSON schema: {err}") from err
    if kind == GRAMMAR_REGEX:
        return llguidance.LLMatcher.grammar_from_regex(value)
    raise GrammarError(f"unknown grammar type {kind}")


def validate(kind: int, value: str) -> None:
    """Raises GrammarError where `value` does not compile (without the tokenizer)."""
    error = llguidance.LLMatcher.validate_grammar(grammar_text(kind, value), limits=parser_limits())
    if error:
        raise GrammarError(error)
