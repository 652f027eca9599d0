"""TGI's request body, typed as serde types it (`router/src/lib.rs` GenerateRequest,
GenerateParameters): unknown keys ignored, `null` accepted for `Option` fields, unsigned ints
non-negative and in range, floats finite f32 (rounded to f32, as TGI compares f32s). Errors are
`BodyError(422)` with serde's wording; the per-value converters are in `serde.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from router.errors import BodyError
from router.validation.serde import (
    I32_MAX,
    I32_MIN,
    U32_MAX,
    U64_MAX,
    Converter,
    boolean,
    describe,
    f32,
    integer,
    invalid_type,
    optional,
    string,
    string_list,
)

_GRAMMAR_TYPES = ("json", "json_object", "regex", "json_schema")


@dataclass(frozen=True)
class Grammar:
    """`{"type": ..., "value": ...}`; `json_object` is stored as `json`."""

    type: str  # "json" | "regex" | "json_schema"
    value: Any


@dataclass(frozen=True)
class GenerateParameters:
    """Every TGI parameter, unvalidated. `None` is "not given" for TGI's `Option` fields; the
    non-`Option` fields (do_sample, stop, watermark, details, decoder_input_details) hold their
    serde default. `do_sample` is True only when the whole `parameters` key was absent."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None
    ignore_eos: bool = False  # not TGI's: generate past EOS, for benchmarks (as vLLM's)


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=GenerateParameters)
    parameters_given: bool = True  # False: the body had no `parameters` key (do_sample=True)

    def with_parameters(self, **changes: Any) -> GenerateRequest:
        """A copy with some parameters replaced (e.g. a route's return_full_text default)."""
        return replace(self, parameters=replace(self.parameters, **changes))


_ABSENT_PARAMETERS = GenerateParameters(do_sample=True)  # TGI's default_parameters()
_MISSING = object()


def parse_generate_request(body: Any) -> GenerateRequest:
    """`{"inputs": str, "parameters": {...}}` -> GenerateRequest, or `BodyError(422)`."""
    request, _ = _parse_request(body, "GenerateRequest", with_stream=False)
    return request


def parse_compat_generate_request(body: Any) -> tuple[GenerateRequest, bool]:
    """The body of `POST /`: a GenerateRequest plus `stream: bool` (default false)."""
    return _parse_request(body, "CompatGenerateRequest", with_stream=True)


def _parse_request(body: Any, struct_name: str, with_stream: bool) -> tuple[GenerateRequest, bool]:
    if not isinstance(body, dict):
        raise BodyError.json_data(f"invalid type: {describe(body)}, expected struct {struct_name}")
    inputs: Any = _MISSING
    parameters: GenerateParameters | None = None
    stream = False
    for key, value in body.items():  # serde reports the first bad field in document order
        if key == "inputs":
            inputs = string(value, "inputs")
        elif key == "parameters":
            parameters = _parameters(value, "parameters")
        elif key == "stream" and with_stream:
            stream = boolean(value, "stream")
    if inputs is _MISSING:
        raise BodyError.json_data("missing field `inputs`")
    if parameters is None:
        return GenerateRequest(inputs, _ABSENT_PARAMETERS, parameters_given=False), stream
    return GenerateRequest(inputs, parameters), stream


def _parameters(value: Any, path: str) -> GenerateParameters:
    if not isinstance(value, dict):
        raise invalid_type(path, value, "struct GenerateParameters")
    fields = {
        name: _PARAMETER_TYPES[name](item, f"{path}.{name}")
        for name, item in value.items()
        if name in _PARAMETER_TYPES
    }
    return GenerateParameters(**fields)


def _grammar(value: Any, path: str) -> Grammar:
    """serde's adjacently tagged `GrammarType` (tag "type", content "value")."""
    if not isinstance(value, dict):
        raise invalid_type(path, value, "adjacently tagged enum GrammarType")
    for key in ("type", "value"):
        if key not in value:
            raise BodyError.json_data(f"{path}: missing field `{key}`")
    kind = string(value["type"], f"{path}.type")
    if kind not in _GRAMMAR_TYPES:
        expected = ", ".join(f"`{name}`" for name in _GRAMMAR_TYPES)
        raise BodyError.json_data(
            f"{path}.type: unknown variant `{kind}`, expected one of {expected}"
        )
    content = value["value"]
    if kind == "regex":
        string(content, f"{path}.value")
    elif kind == "json_schema":
        if not isinstance(content, dict):
            raise invalid_type(f"{path}.value", content, "struct JsonSchemaConfig")
        if "schema" not in content:
            raise BodyError.json_data(f"{path}.value: missing field `schema`")
    return Grammar("json" if kind == "json_object" else kind, content)


_PARAMETER_TYPES: dict[str, Converter] = {
    "best_of": optional(integer("usize", 0, U64_MAX)),
    "temperature": optional(f32),
    "repetition_penalty": optional(f32),
    "frequency_penalty": optional(f32),
    "top_k": optional(integer("i32", I32_MIN, I32_MAX)),
    "top_p": optional(f32),
    "typical_p": optional(f32),
    "do_sample": boolean,
    "max_new_tokens": optional(integer("u32", 0, U32_MAX)),
    "return_full_text": optional(boolean),
    "stop": string_list,
    "truncate": optional(integer("usize", 0, U64_MAX)),
    "watermark": boolean,
    "details": boolean,
    "decoder_input_details": boolean,
    "seed": optional(integer("u64", 0, U64_MAX)),
    "top_n_tokens": optional(integer("u32", 0, U32_MAX)),
    "grammar": optional(_grammar),
    "adapter_id": optional(string),
    "ignore_eos": boolean,
}
