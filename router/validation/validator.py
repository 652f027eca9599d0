"""`Validation.validate`: GenerateRequest -> ValidatedRequest, TGI's checks in TGI's order with
TGI's texts (`router/src/validation.rs`). Errors are `ValidationError` (422).

Admission is decided between two calls: `precheck` runs what TGI checks before taking a
permit (the stream-only rules and best_of), `validate` the rest, once per request. Tokenizing
runs in the executor with the tokenizer's batch call, which releases the GIL, so a prompt of
megabytes never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Protocol

from router.config import RouterConfig
from router.errors import ValidationError
from router.request import (
    SamplingParameters,
    StoppingParameters,
    ValidatedRequest,
    random_seed,
)
from router.validation.generate_request import GenerateParameters, GenerateRequest, Grammar
from router.validation.grammar import check_grammar

DEFAULT_GENERATION_LENGTH = 1024  # TGI schedules at most this many new tokens at a time
# The smallest temperature or repetition penalty accepted: the smallest normal f32. The shard
# divides logits by them; below it (subnormals) dividing even a logit of 4 overflows f32.
MIN_DIVISOR = 2.0**-126


class Tokenizer(Protocol):
    def encode_tail(
        self, text: str, add_special_tokens: bool, keep: int | None, limit: int
    ) -> tuple[int, Sequence[int]]: ...


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
        default_return_full_text: bool = False,
    ) -> ValidatedRequest:
        """Every check after `precheck`, in TGI's order; raises `ValidationError` with TGI's
        text."""
        p = request.parameters
        best_of = p.best_of or 1  # a non-streamed best_of=0 is silently 1
        sampling = _check_sampling(p, best_of)  # 1-7
        seed, top_n_tokens = self._check_counts(p, best_of)  # 8-11
        truncate = self._check_inputs(request.inputs, p.truncate)  # 12-13
        input_ids, stopping = await self._fit_input(  # 14-16
            request.inputs, add_special_tokens, truncate, p.max_new_tokens, p.stop
        )
        stopping = replace(stopping, ignore_eos_token=p.ignore_eos)
        if p.grammar is not None:  # 17
            sampling = await self._with_grammar(sampling, p.grammar)
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
            prefill_logprobs=p.decoder_input_details and self.config.enable_prefill_logprobs,
            return_full_text=default_return_full_text
            if return_full_text is None
            else return_full_text,
            best_of=best_of,
            seed_given=p.seed is not None,
            adapter_id=p.adapter_id,
        )

    async def _with_grammar(
        self, sampling: SamplingParameters, grammar: Grammar
    ) -> SamplingParameters:
        if self.config.disable_grammar_support:
            raise ValidationError("grammar is not supported")
        loop = asyncio.get_running_loop()
        valid = await loop.run_in_executor(self.executor, check_grammar, grammar)
        return replace(sampling, grammar=valid.value, grammar_type=valid.type)

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

    async def _encode(
        self, inputs: str, add_special_tokens: bool, truncate: int | None
    ) -> tuple[int, Sequence[int]]:
        """(input length after truncation, its ids), computed in the executor. The ids are not
        made when the input is too long anyway: for a prompt of megabytes, turning a million
        ids into Python objects alone would hold the GIL (and stall the event loop) for
        tens of milliseconds."""
        encode = functools.partial(
            self.tokenizer.encode_tail, inputs, add_special_tokens, truncate, self.max_input_tokens
        )
        try:
            length, ids = await asyncio.get_running_loop().run_in_executor(self.executor, encode)
        except Exception as e:
            raise ValidationError(f"tokenizer error {e}") from e
        return (length if truncate is None else min(length, truncate)), ids

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
        input_length, ids = await self._encode(inputs, add_special_tokens, truncate)
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
        return tuple(ids), stopping


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
    _check_divisor("temperature", temperature)
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    _check_divisor("repetition_penalty", repetition_penalty)
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


def _check_divisor(name: str, value: float) -> None:
    """Refuses a positive value too small to divide by (its inverse overflows f32). Larger
    values that still overflow some logits are handled by the shard, row by row."""
    if value < MIN_DIVISOR:
        raise ValidationError(
            f"`{name}` must be at least {MIN_DIVISOR:.8g} (the smallest normal f32: the logits "
            f"are divided by it). Given: {value:g}"
        )
