"""What a request is once validated: token ids and every parameter resolved to a value."""

from __future__ import annotations

import secrets
from dataclasses import dataclass


def random_seed() -> int:
    """A random u64, as TGI draws when the request has no seed."""
    return secrets.randbits(64)


@dataclass(frozen=True)
class SamplingParameters:
    """Mirrors the proto's NextTokenChooserParameters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    watermark: bool = False
    grammar: str = ""  # a JSON schema (serialized) or a regex, as grammar_type says
    grammar_type: int = 0  # the proto's GrammarType: 0 none, 1 JSON schema, 2 regex


@dataclass(frozen=True)
class StoppingParameters:
    max_new_tokens: int  # the tokens scheduled now (TGI caps one schedule at 1024)
    max_total_new_tokens: int  # what the user asked for, or the automatic maximum
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True)
class ValidatedRequest:
    inputs: str
    input_ids: tuple[int, ...]  # after truncation (the last `truncate` tokens are kept)
    sampling: SamplingParameters
    stopping: StoppingParameters
    add_special_tokens: bool = True
    truncate: int | None = None
    top_n_tokens: int = 0
    details: bool = False
    decoder_input_details: bool = False
    prefill_logprobs: bool = False  # decoder_input_details with --enable-prefill-logprobs
    return_full_text: bool = False
    best_of: int = 1
    seed_given: bool = False  # the user passed a seed (else it was drawn at random)
    adapter_id: str | None = None

    @property
    def input_length(self) -> int:
        return len(self.input_ids)
