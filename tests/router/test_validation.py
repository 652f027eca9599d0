"""Errors, strict JSON, serde-style parsing and TGI's validation rules, with a fake tokenizer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.config import RouterConfig
from router.errors import (
    BodyError,
    GenerationError,
    OverloadedError,
    TemplateError,
    ValidationError,
)
from router.validation.generate_request import (
    GenerateParameters,
    GenerateRequest,
    Grammar,
    parse_compat_generate_request,
    parse_generate_request,
)
from router.validation.json_body import loads_strict
from router.validation.validator import Validation

BOS = 0


class ListTokenizer:
    """encode_tail from encode, with the semantics of router.text.tokenizer.Tokenizer."""

    def encode_tail(self, text, add_special_tokens, keep, limit):
        ids = self.encode(text, add_special_tokens)
        kept = len(ids) if keep is None else min(len(ids), keep)
        return len(ids), (ids[len(ids) - kept :] if kept <= limit else [])


class WordTokenizer(ListTokenizer):
    """One id per whitespace-separated word: digits are their own id, other words 1000+len.
    Prepends BOS when add_special_tokens. Records the thread it ran on."""

    def __init__(self, fail: str | None = None):
        self.threads: list[int] = []
        self.fail = fail

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError(self.fail)
        ids = [int(w) if w.isdigit() else 1000 + len(w) for w in text.split()]
        return [BOS, *ids] if add_special_tokens else ids


class ByteTokenizer(ListTokenizer):
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode())


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(2, thread_name_prefix="validation") as pool:
        yield pool


def make_validation(executor, tokenizer=None, **overrides) -> Validation:
    limits = {"max_input_tokens": 10, "max_total_tokens": 20}
    config = RouterConfig(**{**limits, **overrides})
    return Validation(config, tokenizer or WordTokenizer(), executor)


def words(n: int) -> str:
    return " ".join(str(i) for i in range(1, n + 1))


def validate(executor, body, stream=False, add_special_tokens=True, tokenizer=None, **config):
    """What a route runs: the prechecks (before admission), then the rest of validation."""
    validation = make_validation(executor, tokenizer, **config)
    request = parse_generate_request(body)
    validation.precheck(request, stream)
    return asyncio.run(validation.validate(request, add_special_tokens))


def validation_error(executor, body, stream=False, **config) -> str:
    with pytest.raises(ValidationError) as info:
        validate(executor, body, stream=stream, **config)
    assert str(info.value) == f"Input validation error: {info.value.detail}"
    return info.value.detail


def body_error(value) -> BodyError:
    with pytest.raises(BodyError) as info:
        parse_generate_request(value)
    return info.value


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "error, text, error_type, status",
    [
        (ValidationError("x"), "Input validation error: x", "validation", 422),
        (
            GenerationError("Server error: boom"),
            "Request failed during generation: Server error: boom",
            "generation",
            424,
        ),
        (OverloadedError(), "Model is overloaded", "overloaded", 429),
        (TemplateError(ValueError("bad")), "Template error: bad", "template_error", 422),
    ],
)
def test_error_texts_types_and_statuses(error, text, error_type, status):
    assert str(error) == text
    assert (error.error_type, error.status) == (error_type, status)
    assert error.to_json() == {"error": text, "error_type": error_type}


def test_body_errors_are_axum_rejections():
    assert BodyError.json_syntax("x").status == 400
    assert str(BodyError.json_syntax("x")) == "Failed to parse the request body as JSON: x"
    assert (
        str(BodyError.json_data("y"))
        == "Failed to deserialize the JSON body into the target type: y"
    )
    assert BodyError.json_data("y").status == 422
    assert BodyError.missing_json_content_type().status == 415
    assert (
        str(BodyError.missing_json_content_type())
        == "Expected request with `Content-Type: application/json`"
    )
    assert BodyError(400, "t").to_json()["error"] == "t"


# ----------------------------------------------------------------------------------------------
# strict JSON


def syntax_error(data) -> str:
    with pytest.raises(BodyError) as info:
        loads_strict(data)
    assert info.value.status == 400
    assert str(info.value).startswith("Failed to parse the request body as JSON: ")
    return str(info.value)


def test_loads_strict_accepts_plain_json():
    text = '{"inputs": "h\\u00e9 \\ud83d\\ude00", "parameters": {"stop": ["a"], "seed": 1}}'
    assert loads_strict(text.encode()) == {
        "inputs": "hé 😀",
        "parameters": {"stop": ["a"], "seed": 1},
    }
    assert loads_strict(text) == loads_strict(text.encode())
    assert loads_strict(b'{"inputs": "\\\\ud800"}') == {"inputs": "\\ud800"}  # escaped backslash


@pytest.mark.parametrize(
    "data", [b'{"inputs":"hi",', b"", b"{'inputs': 1}", b'{"a":1}x', b'\xef\xbb\xbf{"inputs":"hi"}']
)
def test_loads_strict_syntax_errors(data):
    syntax_error(data)


def test_loads_strict_syntax_error_has_position():
    assert "line 2 column" in syntax_error(b'{\n "inputs": }')


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_loads_strict_rejects_non_finite_constants(constant):
    syntax_error(f'{{"inputs":"hi","parameters":{{"temperature":{constant}}}}}'.encode())


def test_loads_strict_rejects_invalid_utf8():
    assert "line 1 column 12" in syntax_error(b'{"inputs":"\xff"}')
    syntax_error(b'{"inputs":"\xed\xa0\x80"}')  # a UTF-8-encoded surrogate


@pytest.mark.parametrize("escape", ["\\ud800", "\\uDC00", "\\ud83d x", "x\\ude00"])
def test_loads_strict_rejects_lone_surrogates(escape):
    syntax_error(f'{{"inputs": "{escape} hi"}}'.encode())
    syntax_error(f'{{"{escape}": 1}}'.encode())
    syntax_error(f'["{escape}"]'.encode())


def test_loads_strict_rejects_raw_surrogate_in_str():
    syntax_error('{"inputs": "\ud800"}')


def test_loads_strict_depth_limit_is_64():
    assert loads_strict(b"[" * 64 + b"]" * 64) is not None
    assert "recursion" in syntax_error(b"[" * 65 + b"]" * 65)
    syntax_error(b'{"inputs":"hi","x":' + b'{"a":' * 65 + b"1" + b"}" * 66)


def test_loads_strict_many_brackets_in_strings_are_fine():
    assert loads_strict(b'{"inputs":"' + b"[{" * 200 + b'"}')["inputs"] == "[{" * 200


def test_loads_strict_depth_ignores_brackets_in_strings_with_escaped_quotes():
    tricky = b'"a\\"' + b"[" * 100 + b'\\\\"'  # "a\"[[[...\\" : one string
    assert len(loads_strict(b"[" * 64 + tricky + b"]" * 64)) == 1
    syntax_error(b"[" * 65 + tricky + b"]" * 65)


def test_loads_strict_big_flat_bodies_are_fast():
    start = time.perf_counter()
    assert len(loads_strict(b'{"e":[' + b"[1]," * 200_000 + b"[1]]}")["e"]) == 200_001
    assert time.perf_counter() - start < 2


def test_loads_strict_very_deep_nesting_fails_fast():
    start = time.perf_counter()
    syntax_error(b'{"inputs":"hi","extra":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert time.perf_counter() - start < 2


def test_loads_strict_rejects_5000_digit_integers():
    syntax_error(b'{"inputs":"hi","parameters":{"seed":' + b"9" * 5000 + b"}}")


# ----------------------------------------------------------------------------------------------
# serde-style parsing


def test_parse_minimal_request_defaults_to_sampling():
    request = parse_generate_request({"inputs": "hi"})
    assert request == GenerateRequest(
        "hi", GenerateParameters(do_sample=True), parameters_given=False
    )


def test_parse_present_parameters_default_to_greedy():
    request = parse_generate_request({"inputs": "hi", "parameters": {}})
    assert request.parameters_given and request.parameters == GenerateParameters()
    assert not request.parameters.do_sample


def test_parse_all_fields():
    parameters = {
        "best_of": 2,
        "temperature": 0.5,
        "repetition_penalty": 1.5,
        "frequency_penalty": -1,
        "top_k": -3,
        "top_p": 0.25,
        "typical_p": 0.75,
        "do_sample": True,
        "max_new_tokens": 7,
        "return_full_text": True,
        "stop": ["a", "b"],
        "truncate": 3,
        "watermark": True,
        "details": True,
        "decoder_input_details": True,
        "seed": 2**64 - 1,
        "top_n_tokens": 4,
        "grammar": {"type": "json_object", "value": {}},
        "adapter_id": "lora",
    }
    p = parse_generate_request({"inputs": "hi", "parameters": parameters}).parameters
    assert p == GenerateParameters(
        **{**parameters, "stop": ("a", "b"), "grammar": Grammar("json", {})}
    )
    assert isinstance(p.frequency_penalty, float)


def test_parse_ignores_unknown_keys_and_accepts_nulls_for_options():
    optional = [
        "best_of",
        "temperature",
        "repetition_penalty",
        "frequency_penalty",
        "top_k",
        "top_p",
        "typical_p",
        "max_new_tokens",
        "return_full_text",
        "truncate",
        "seed",
        "top_n_tokens",
        "grammar",
        "adapter_id",
    ]
    body = {"inputs": "hi", "model": "x", "parameters": {**dict.fromkeys(optional), "foo": 1}}
    assert parse_generate_request(body).parameters == GenerateParameters()


def test_parse_rounds_floats_to_f32():
    p = parse_generate_request({"inputs": "x", "parameters": {"top_p": 0.99999999999}}).parameters
    assert p.top_p == 1.0  # so TGI's f32 `top_p < 1.0` check rejects it too


@pytest.mark.parametrize(
    "body, detail",
    [
        ([], "invalid type: sequence, expected struct GenerateRequest"),
        ("x", 'invalid type: string "x", expected struct GenerateRequest'),
        (None, "invalid type: null, expected struct GenerateRequest"),
        (1, "invalid type: integer `1`, expected struct GenerateRequest"),
        ({}, "missing field `inputs`"),
        ({"parameters": {}}, "missing field `inputs`"),
        ({"inputs": 5}, "inputs: invalid type: integer `5`, expected a string"),
        ({"inputs": None}, "inputs: invalid type: null, expected a string"),
        (
            {"inputs": "x", "parameters": None},
            "parameters: invalid type: null, expected struct GenerateParameters",
        ),
        (
            {"inputs": "x", "parameters": []},
            "parameters: invalid type: sequence, expected struct GenerateParameters",
        ),
    ],
)
def test_parse_request_shape_errors(body, detail):
    error = body_error(body)
    assert error.status == 422
    assert str(error) == f"Failed to deserialize the JSON body into the target type: {detail}"


@pytest.mark.parametrize(
    "name, value, detail",
    [
        ("temperature", "hot", 'invalid type: string "hot", expected f32'),
        ("temperature", True, "invalid type: boolean `true`, expected f32"),
        ("temperature", float("nan"), "invalid value: floating point `nan`, expected a finite f32"),
        ("top_p", float("inf"), "invalid value: floating point `inf`, expected a finite f32"),
        ("top_p", 1e39, "invalid value: floating point `1e+39`, expected a finite f32"),
        ("temperature", 10**39, "expected a finite f32"),
        ("max_new_tokens", -1, "invalid value: integer `-1`, expected u32"),
        ("max_new_tokens", 2**32, "invalid value: integer `4294967296`, expected u32"),
        ("max_new_tokens", "ten", 'invalid type: string "ten", expected u32'),
        ("max_new_tokens", 10.0, "invalid type: floating point `10.0`, expected u32"),
        ("max_new_tokens", False, "invalid type: boolean `false`, expected u32"),
        ("max_new_tokens", 10**100, "expected u32"),
        ("seed", -1, "invalid value: integer `-1`, expected u64"),
        ("seed", 2**64, "invalid value: integer `18446744073709551616`, expected u64"),
        ("best_of", -1, "invalid value: integer `-1`, expected usize"),
        ("truncate", -5, "invalid value: integer `-5`, expected usize"),
        ("top_n_tokens", -1, "invalid value: integer `-1`, expected u32"),
        ("top_k", 2**31, "invalid value: integer `2147483648`, expected i32"),
        ("top_k", 1.5, "invalid type: floating point `1.5`, expected i32"),
        ("do_sample", 1, "invalid type: integer `1`, expected a boolean"),
        ("do_sample", None, "invalid type: null, expected a boolean"),
        ("details", "true", 'invalid type: string "true", expected a boolean'),
        ("watermark", None, "invalid type: null, expected a boolean"),
        ("return_full_text", 0, "invalid type: integer `0`, expected a boolean"),
        ("stop", "x", 'invalid type: string "x", expected a sequence'),
        ("stop", None, "invalid type: null, expected a sequence"),
        ("adapter_id", 3, "invalid type: integer `3`, expected a string"),
        ("grammar", "regex", 'invalid type: string "regex", expected adjacently tagged enum'),
    ],
)
def test_parse_parameter_type_errors(name, value, detail):
    error = body_error({"inputs": "x", "parameters": {name: value}})
    assert error.status == 422
    prefix = "Failed to deserialize the JSON body into the target type: "
    assert str(error).startswith(f"{prefix}parameters.{name}: ")
    assert detail in str(error)


def test_parse_stop_element_error_has_index():
    error = body_error({"inputs": "x", "parameters": {"stop": ["a", 1]}})
    assert "parameters.stop[1]: invalid type: integer `1`, expected a string" in str(error)


def test_parse_reports_first_bad_field_in_document_order():
    error = body_error({"inputs": "x", "parameters": {"top_k": "a", "temperature": "b"}})
    assert "parameters.top_k" in str(error)


def test_parse_long_strings_are_shortened_in_errors():
    assert len(str(body_error({"inputs": "x", "parameters": {"seed": "y" * 10_000}}))) < 300


@pytest.mark.parametrize(
    "grammar, detail",
    [
        ({"type": "json"}, "parameters.grammar: missing field `value`"),
        ({"value": "a"}, "parameters.grammar: missing field `type`"),
        ({"type": "xml", "value": 1}, "parameters.grammar.type: unknown variant `xml`"),
        ({"type": "regex", "value": 1}, "parameters.grammar.value: invalid type: integer `1`"),
        ({"type": "json_schema", "value": {}}, "parameters.grammar.value: missing field `schema`"),
    ],
)
def test_parse_grammar_shape_errors(grammar, detail):
    assert detail in str(body_error({"inputs": "x", "parameters": {"grammar": grammar}}))


def test_parse_grammar_variants():
    def parse(grammar):
        return parse_generate_request({"inputs": "x", "parameters": {"grammar": grammar}})

    assert parse({"type": "regex", "value": "a+"}).parameters.grammar == Grammar("regex", "a+")
    schema = {"name": "n", "schema": {"type": "object"}}
    assert parse({"type": "json_schema", "value": schema}).parameters.grammar.value == schema


def test_parse_compat_request_stream_flag():
    request, stream = parse_compat_generate_request({"inputs": "x", "stream": True})
    assert stream and request.parameters.do_sample
    assert parse_compat_generate_request({"inputs": "x"})[1] is False
    with pytest.raises(BodyError, match="stream: invalid type"):
        parse_compat_generate_request({"inputs": "x", "stream": "yes"})
    assert parse_generate_request({"inputs": "x", "stream": "ignored"}).inputs == "x"


# ----------------------------------------------------------------------------------------------
# validation: each message


def params(**values) -> dict:
    return {"inputs": "hello world", "parameters": values}


@pytest.mark.parametrize(
    "parameters, detail",
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"temperature": -1}, "`temperature` must be strictly positive"),
        ({"temperature": 1e-46}, "`temperature` must be strictly positive"),  # 0 in f32
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"top_k": -1}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 10. Given: 0"),
        ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
        (
            {"max_new_tokens": 18},
            (
                "`inputs` tokens + `max_new_tokens` must be <= 20. Given: 3 `inputs` tokens and 18 "
                "`max_new_tokens`"
            ),
        ),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ],
)
def test_validation_messages(executor, parameters, detail):
    assert validation_error(executor, params(**parameters)) == detail


PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize(
    "grammar, detail",
    [
        ({"type": "regex", "value": "a(b"}, "grammar is not valid: "),
        ({"type": "json", "value": {"type": "object"}}, "grammar is not valid: Grammar must have "
         "a 'properties' field"),  # TGI's rule
        ({"type": "json", "value": "{bad"}, "grammar is not valid: Expecting property name"),
        ({"type": "json", "value": 5}, "grammar is not supported"),
        ({"type": "json", "value": {"type": 5, "properties": {}}}, "grammar is not valid: 5 is "
         "not valid under any of the given schemas"),  # the draft 2020-12 meta-schema
        ({"type": "json_schema", "value": {"schema": {"properties": {"a": {"$ref": "#/$defs/x"}}}}},
         "grammar is not valid: "),  # a reference to nothing does not compile
        ({"type": "regex", "value": "a" * 70_000}, "grammar is not valid: it is 70000 bytes, "
         "more than the limit of 65536"),
    ],
)  # fmt: skip
def test_grammar_validation_messages(executor, grammar, detail):
    assert validation_error(executor, params(grammar=grammar)).startswith(detail)


@pytest.mark.parametrize(
    "grammar, kind, value",
    [
        ({"type": "regex", "value": "[0-9]+"}, 2, "[0-9]+"),
        ({"type": "json", "value": PERSON}, 1, PERSON),
        ({"type": "json_object", "value": json.dumps(PERSON)}, 1, PERSON),  # a string holding it
        ({"type": "json_schema", "value": {"name": "p", "schema": PERSON}}, 1, PERSON),
    ],
)
def test_valid_grammars_go_to_the_shards(executor, grammar, kind, value):
    sampling = validate(executor, params(grammar=grammar)).sampling
    assert sampling.grammar_type == kind
    assert (json.loads(sampling.grammar) if kind == 1 else sampling.grammar) == value


def test_grammar_support_can_be_disabled(executor):
    body = params(grammar={"type": "regex", "value": "a+"})
    detail = validation_error(executor, body, disable_grammar_support=True)
    assert detail == "grammar is not supported"


def test_empty_inputs(executor):
    assert validation_error(executor, {"inputs": ""}) == "`inputs` cannot be empty"


def test_inputs_too_long(executor):
    assert (
        validation_error(executor, {"inputs": words(10), "parameters": {"max_new_tokens": 1}})
        == "`inputs` must have less than 10 tokens. Given: 11"
    )


def test_best_of_disabled(executor):
    assert (
        validation_error(executor, params(best_of=2, do_sample=True), max_best_of=1)
        == "`best_of` != 1 is not allowed for this endpoint"
    )


def test_tokenizer_error(executor):
    with pytest.raises(ValidationError, match="tokenizer error kaput"):
        validate(executor, {"inputs": "hi"}, tokenizer=WordTokenizer(fail="kaput"))


def test_zero_tokens_after_tokenization_is_rejected(executor):
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        validate(executor, {"inputs": "   "}, add_special_tokens=False)


def test_validation_error_type_and_status(executor):
    with pytest.raises(ValidationError) as info:
        validate(executor, params(top_k=0))
    assert info.value.to_json() == {
        "error": "Input validation error: `top_k` must be strictly positive",
        "error_type": "validation",
    }
    assert info.value.status == 422


# ----------------------------------------------------------------------------------------------
# validation: order (when two rules fail, TGI's earlier one wins)

ORDERED_FAILURES = [  # (parameters that break rule i, its message prefix), in TGI's order
    ({"best_of": 2}, "you must use sampling"),
    ({"temperature": 0}, "`temperature`"),
    ({"repetition_penalty": 0}, "`repetition_penalty`"),
    ({"frequency_penalty": 3}, "`frequency_penalty`"),
    ({"top_p": 1.0}, "`top_p`"),
    ({"typical_p": 1.0}, "`typical_p`"),
    ({"top_k": 0}, "`top_k`"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["s"] * 5}, "`stop`"),
    ({"seed": 1, "best_of": 2, "do_sample": True}, "`seed`"),
    ({"top_n_tokens": 9}, "`top_n_tokens`"),
    ({"truncate": 0}, "`truncate`"),
    ({"max_new_tokens": 100}, "`inputs` tokens + `max_new_tokens`"),
    ({"grammar": {"type": "json", "value": {}}}, "grammar"),
]


SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "typical_p"}


@pytest.mark.parametrize("first", range(len(ORDERED_FAILURES)))
def test_earlier_rule_wins(executor, first):
    earlier, message = ORDERED_FAILURES[first]
    for later, _ in ORDERED_FAILURES[first + 1 :]:
        if first == 0 and SAMPLING_KEYS & later.keys():
            continue  # a set warper (even an invalid one) counts as sampling for best_of
        merged = {**later, **earlier}
        assert validation_error(executor, params(**merged)).startswith(message), (earlier, later)


def test_empty_inputs_come_after_parameter_checks_and_before_truncate(executor):
    assert validation_error(executor, {"inputs": "", "parameters": {"top_n_tokens": 9}}).startswith(
        "`top_n_tokens`"
    )
    assert (
        validation_error(executor, {"inputs": "", "parameters": {"truncate": 0}})
        == "`inputs` cannot be empty"
    )


def test_max_total_check_comes_before_input_length_check(executor):
    detail = validation_error(executor, {"inputs": words(12), "parameters": {"max_new_tokens": 9}})
    assert detail.startswith("`inputs` tokens + `max_new_tokens` must be <= 20. Given: 13")


def test_best_of_limit_comes_before_everything_else(executor):
    assert validation_error(executor, params(best_of=3, temperature=0)).startswith("`best_of` must")


# ----------------------------------------------------------------------------------------------
# validation: stream-only rules


def test_stream_rejects_best_of_not_one(executor):
    for best_of in (0, 2, 3):
        assert (
            validation_error(executor, params(best_of=best_of, do_sample=True), stream=True)
            == "`best_of` != 1 is not supported when streaming tokens"
        )
    assert validate(executor, params(best_of=1), stream=True).best_of == 1


def test_stream_rejects_decoder_input_details(executor):
    assert (
        validation_error(executor, params(decoder_input_details=True), stream=True)
        == "`decoder_input_details` == true is not supported when streaming tokens"
    )
    assert validate(executor, params(decoder_input_details=True)).details


def test_stream_checks_come_first(executor):
    body = params(best_of=2, decoder_input_details=True, temperature=0)
    assert validation_error(executor, body, stream=True).startswith("`best_of` != 1")


def test_non_stream_best_of_zero_is_one(executor):
    assert validate(executor, params(best_of=0)).best_of == 1


def test_best_of_with_sampling_is_valid(executor):
    for sampling in (
        {"do_sample": True},
        {"temperature": 1.0},
        {"top_k": 5},
        {"top_p": 0.9},
        {"typical_p": 0.9},
    ):
        request = validate(executor, params(best_of=2, **sampling))
        assert request.best_of == 2 and not request.seed_given


# ----------------------------------------------------------------------------------------------
# validation: the resolved request


def test_defaults_of_a_minimal_request(executor):
    request = validate(executor, {"inputs": "hello world"})
    assert request.input_ids == (BOS, 1005, 1005) and request.input_length == 3
    assert request.sampling.do_sample  # no `parameters` key: TGI samples
    assert (
        request.sampling.temperature,
        request.sampling.top_k,
        request.sampling.top_p,
        request.sampling.typical_p,
        request.sampling.repetition_penalty,
        request.sampling.frequency_penalty,
    ) == (1.0, 0, 1.0, 1.0, 1.0, 0.0)
    assert not (request.details or request.decoder_input_details or request.return_full_text)
    assert (request.top_n_tokens, request.best_of, request.truncate) == (0, 1, None)
    assert request.add_special_tokens and request.stopping.stop_sequences == ()


def test_empty_parameters_are_greedy(executor):
    assert not validate(executor, params()).sampling.do_sample


@pytest.mark.parametrize(
    "warper", [{"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.5}, {"typical_p": 0.5}]
)
def test_any_warper_means_sampling(executor, warper):
    assert validate(executor, params(**warper)).sampling.do_sample


def test_temperature_one_alone_stays_greedy(executor):
    assert not validate(executor, params(temperature=1.0)).sampling.do_sample


def test_parameters_are_carried(executor):
    request = validate(
        executor,
        params(
            temperature=0.5,
            top_k=4,
            top_p=0.5,
            typical_p=0.25,
            repetition_penalty=1.25,
            frequency_penalty=0.5,
            watermark=True,
            stop=["x", "y"],
            top_n_tokens=5,
            details=True,
            return_full_text=True,
            adapter_id="lora",
            seed=42,
            max_new_tokens=3,
        ),
    )
    s = request.sampling
    assert (
        s.temperature,
        s.top_k,
        s.top_p,
        s.typical_p,
        s.repetition_penalty,
        s.frequency_penalty,
        s.watermark,
        s.seed,
    ) == (0.5, 4, 0.5, 0.25, 1.25, 0.5, True, 42)
    assert request.seed_given and request.details and request.return_full_text
    assert request.stopping.stop_sequences == ("x", "y") and request.top_n_tokens == 5
    assert request.adapter_id == "lora" and request.inputs == "hello world"


def test_return_full_text_default_can_be_overridden(executor):
    validation = make_validation(executor)
    request = parse_generate_request({"inputs": "hi"})
    assert asyncio.run(validation.validate(request, default_return_full_text=True)).return_full_text
    explicit = request.with_parameters(return_full_text=False)
    assert not asyncio.run(
        validation.validate(explicit, default_return_full_text=True)
    ).return_full_text


def test_decoder_input_details_forces_details(executor):
    request = validate(executor, params(decoder_input_details=True))
    assert request.details and request.decoder_input_details


def test_random_seed_when_absent(executor):
    seeds = {validate(executor, params(do_sample=True)).sampling.seed for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**64 for s in seeds)
    assert not validate(executor, params()).seed_given


def test_truncation_keeps_the_last_tokens(executor):
    request = validate(executor, {"inputs": words(15), "parameters": {"truncate": 4}})
    assert request.input_ids == (12, 13, 14, 15) and request.truncate == 4
    assert request.stopping.max_new_tokens == 16


def test_truncate_larger_than_the_input_keeps_everything(executor):
    assert validate(executor, params(truncate=10)).input_ids == (BOS, 1005, 1005)


def test_add_special_tokens_false(executor):
    assert validate(executor, {"inputs": "1 2"}, add_special_tokens=False).input_ids == (1, 2)


def test_whitespace_inputs_are_valid(executor):
    request = validate(executor, {"inputs": "  \n"}, tokenizer=ByteTokenizer())
    assert request.input_ids == (32, 32, 10)


def test_auto_max_new_tokens(executor):
    stopping = validate(executor, {"inputs": words(4)}).stopping
    assert (stopping.max_new_tokens, stopping.max_total_new_tokens) == (15, 15)


def test_auto_max_new_tokens_is_scheduled_1024_at_a_time(executor):
    stopping = validate(
        executor, {"inputs": words(4)}, max_input_tokens=100, max_total_tokens=4096
    ).stopping
    assert (stopping.max_new_tokens, stopping.max_total_new_tokens) == (1024, 4091)


def test_explicit_max_new_tokens_is_chunked_and_checked_by_chunk(executor):
    stopping = validate(
        executor, params(max_new_tokens=3000), max_input_tokens=100, max_total_tokens=2000
    ).stopping
    assert (stopping.max_new_tokens, stopping.max_total_new_tokens) == (1024, 3000)
    detail = validation_error(
        executor, params(max_new_tokens=3000), max_input_tokens=100, max_total_tokens=1026
    )
    assert detail == (
        "`inputs` tokens + `max_new_tokens` must be <= 1026. Given: 3 `inputs` "
        "tokens and 1024 `max_new_tokens`"
    )


def test_max_new_tokens_exactly_filling_the_budget(executor):
    assert validate(executor, params(max_new_tokens=17)).stopping.max_new_tokens == 17


def test_tokenization_runs_in_the_executor(executor):
    tokenizer = WordTokenizer()
    validate(executor, {"inputs": "hi"}, tokenizer=tokenizer)
    assert tokenizer.threads and tokenizer.threads[0] != threading.get_ident()
    worker_idents = {t.ident for t in threading.enumerate() if t.name.startswith("validation")}
    assert tokenizer.threads[0] in worker_idents


def test_validation_needs_warmup_limits(executor):
    with pytest.raises(ValueError, match="warmup"):
        Validation(RouterConfig(), WordTokenizer(), executor)


def test_end_to_end_from_bytes(executor):
    body = b'{"inputs": "1 2 3", "parameters": {"max_new_tokens": 5, "truncate": 2, "x": null}}'
    request = validate(executor, loads_strict(body))
    assert request.input_ids == (2, 3) and request.stopping.max_new_tokens == 5
