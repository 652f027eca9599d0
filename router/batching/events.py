"""What a request in the batching loop sends back to the HTTP layer, one event per step.

Events flow from the batching loop to the handler through the entry's queue (the loop never
waits on a slow client): a `PrefillEvent` (prompt logprobs, when asked), then one `TokenEvent`
per generated token, then an `EndEvent` for the last one, or an `ErrorEvent` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import InferError


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None  # None when unknown or not finite (serde writes NaN and -inf as null)
    special: bool


@dataclass(frozen=True)
class PrefillEvent:
    tokens: list[Token]  # the prompt, first logprob None


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token]
    content: str = ""  # the text a client may see now with stop sequences cut out (OpenAI)


@dataclass(frozen=True)
class EndEvent:
    token: Token
    top_tokens: list[Token]
    generated_text: str  # the whole output, special tokens skipped, stop sequence included
    finish_reason: str  # "length", "eos_token" or "stop_sequence"
    generated_tokens: int
    seed: int | None
    queued_at: float
    started_at: float
    generated_ids: tuple[int, ...] = ()
    content: str = ""  # as TokenEvent.content; the text before the stop sequence on a stop


@dataclass(frozen=True)
class ErrorEvent:
    error: InferError


Event = PrefillEvent | TokenEvent | EndEvent | ErrorEvent
