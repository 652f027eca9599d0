"""Request parsing and validation: JSON body -> GenerateRequest -> ValidatedRequest.

Three steps, each TGI-compatible (`router/src/lib.rs`, `router/src/validation.rs`):
  1. `loads_strict(bytes)` (`router/json_body.py`, re-exported here): JSON text -> Python value.
     It rejects what serde_json rejects and Python's `json` accepts (NaN/Infinity, lone
     surrogates, invalid UTF-8) and nesting deeper than 64 levels. Errors are `BodyError(400)`.
  2. `parse_generate_request(value)`: serde's typing of `GenerateRequest`: unknown keys ignored,
     `null` accepted for `Option` fields, unsigned ints non-negative and in range, floats finite
     f32 (rounded to f32, as TGI compares f32s). Errors are `BodyError(422)`. The per-value
     converters are in `router/serde.py`.
  3. `Validation.validate(request)`: TGI's checks, in TGI's order, with TGI's texts. Errors are
     `ValidationError` (422). Tokenization runs in the given executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from router.config import RouterConfig
from router.errors import BodyError, ValidationError
from router.json_body import MAX_JSON_DEPTH, loads_strict
from router.request import SamplingParameters, StoppingParameters, ValidatedRequest
from router.serde import (
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

__all__ = [
    "DEFAULT_GENERATION_LENGTH",
    "MAX_JSON_DEPTH",
    "GenerateParameters",
    "GenerateRequest",
    "Grammar",
    "Tokenizer",
    "Validation",
    "loads_strict",
    "parse_compat_generate_request",
    "parse_generate_request",
    "random_seed",
]

DEFAULT_GENERATION_LENGTH = 1024  # TGI schedules at most this many new tokens at a time

_GRAMMAR_TYPES = ("json", "json_object", "regex", "json_schema")


# ----------------------------------------------------------------------------------------------
# 2. Typed request (serde's view of lib.rs GenerateRequest / GenerateParameters)


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
}


# ----------------------------------------------------------------------------------------------
# 3. Validation (validation.rs:Validation::validate, validate_input, validate_best_of)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...


def random_seed() -> int:
    """A random u64, as TGI draws when the request has no seed."""
    return secrets.randbits(64)


class Validation:
    """GenerateRequest -> ValidatedRequest. Limits come from the config after warmup."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, executor: Executor):
        if config.max_input_tokens is None or config.max_total_tokens is None:
            raise ValueError(
                "Validation needs max_input_tokens and max_total_tokens (known after warmup)"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.executor = executor
        self.max_input_tokens: int = config.max_input_tokens
        self.max_total_tokens: int = config.max_total_tokens

    async def validate(
        self,
        request: GenerateRequest,
        add_special_tokens: bool = True,
        stream: bool = False,
        default_return_full_text: bool = False,
    ) -> ValidatedRequest:
        """Every check, in TGI's order; raises `ValidationError` with TGI's text."""
        self.precheck(request, stream)
        p = request.parameters
        best_of = p.best_of or 1  # a non-streamed best_of=0 is silently 1
        sampling = _check_sampling(p, best_of)  # 1-7
        seed, top_n_tokens = self._check_counts(p, best_of)  # 8-11
        truncate = self._check_inputs(request.inputs, p.truncate)  # 12-13
        input_ids, stopping = await self._fit_input(  # 14-16
            request.inputs, add_special_tokens, truncate, p.max_new_tokens, p.stop
        )
        if p.grammar is not None:  # 17
            raise ValidationError("grammar is not supported")
        return_full_text = p.return_full_text
        return ValidatedRequest(
            inputs=request.inputs,
            input_ids=input_ids,
            sampling=replace(sampling, seed=seed),
            stopping=stopping,
            add_special_tokens=add_special_tokens,
            truncate=truncate,
            top_n_tokens=top_n_tokens,
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=default_return_full_text
            if return_full_text is None
            else return_full_text,
            best_of=best_of,
            seed_given=p.seed is not None,
            adapter_id=p.adapter_id,
        )

    def precheck(self, request: GenerateRequest, stream: bool = False) -> None:
        """What TGI checks before taking an admission permit: stream-only rules, then best_of."""
        p = request.parameters
        if stream:
            if p.best_of is not None and p.best_of != 1:
                raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
            if p.decoder_input_details:
                raise ValidationError(
                    "`decoder_input_details` == true is not supported when streaming tokens"
                )
        elif p.best_of is not None and p.best_of > 1:
            self.validate_best_of(p.best_of)

    def validate_best_of(self, best_of: int) -> int:
        max_best_of = self.config.max_best_of
        if max_best_of == 1 and best_of != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
        return best_of

    async def tokenize(self, inputs: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, computed in the executor so the event loop never blocks."""
        encode = functools.partial(
            self.tokenizer.encode, inputs, add_special_tokens=add_special_tokens
        )
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, encode)
        except Exception as e:
            raise ValidationError(f"tokenizer error {e}") from e
        return list(getattr(result, "ids", result))  # a raw `tokenizers.Encoding` works too

    def _check_counts(self, p: GenerateParameters, best_of: int) -> tuple[int, int]:
        """Items 8-11: max_new_tokens, stop, seed, top_n_tokens -> (seed, top_n_tokens)."""
        if p.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        max_stop = self.config.max_stop_sequences
        if len(p.stop) > max_stop:
            raise ValidationError(
                f"`stop` supports up to {max_stop} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        max_top_n = self.config.max_top_n_tokens
        if p.top_n_tokens is not None and p.top_n_tokens > max_top_n:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {max_top_n}. Given: {p.top_n_tokens}"
            )
        seed = random_seed() if p.seed is None else p.seed
        return seed, p.top_n_tokens or 0

    def _check_inputs(self, inputs: str, truncate: int | None) -> int | None:
        """Items 12-13: empty inputs (whitespace is fine), truncate in 1..=max_input_tokens."""
        if inputs == "":
            raise ValidationError("`inputs` cannot be empty")
        if truncate is not None and not 0 < truncate <= self.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than "
                f"{self.max_input_tokens}. Given: {truncate}"
            )
        return truncate

    async def _fit_input(
        self,
        inputs: str,
        add_special_tokens: bool,
        truncate: int | None,
        max_new_tokens: int | None,
        stop: Iterable[str],
    ) -> tuple[tuple[int, ...], StoppingParameters]:
        """Items 14-16: tokenize, keep the last `truncate` ids, size the first chunk."""
        ids = await self.tokenize(inputs, add_special_tokens)
        input_length = len(ids) if truncate is None else min(len(ids), truncate)
        if max_new_tokens is None:  # as many as fit; re-scheduled every 1024 tokens
            max_new_tokens = max(self.max_total_tokens - input_length, 0)
        chunk = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
        if input_length + chunk > self.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {chunk} `max_new_tokens`"
            )
        if input_length > self.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {self.max_input_tokens} "
                f"tokens. Given: {input_length}"
            )
        if input_length == 0:  # TGI has no check; a shard cannot prefill zero tokens
            raise ValidationError("`inputs` cannot be empty")
        stopping = StoppingParameters(
            max_new_tokens=chunk, max_total_new_tokens=max_new_tokens, stop_sequences=tuple(stop)
        )
        return tuple(ids[len(ids) - input_length :]), stopping


def _check_sampling(p: GenerateParameters, best_of: int) -> SamplingParameters:
    """Items 1-7. `do_sample` comes out resolved as the shard sees it: any warper samples."""
    sampling_asked = p.do_sample or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    if best_of > 1 and not sampling_asked:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    top_k, top_p = p.top_k or 0, p.top_p or 1.0
    typical_p = p.typical_p or 1.0
    do_sample = p.do_sample or (temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0)
    return SamplingParameters(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        do_sample=do_sample,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        watermark=p.watermark,
    )
