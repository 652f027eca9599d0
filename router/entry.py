"""A request in flight inside the router: its validated input, where its events go, its KV
blocks and the state of its output (detokenizer, stop sequences).

Events flow from the batching loop to the HTTP handler through `events`, an unbounded
asyncio.Queue (the loop never waits on a slow client). When the client goes away the handler
sets `cancelled`; the loop then drops the entry before the next step and frees its blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.block_allocator import Allocation
from router.errors import InferError
from router.request import ValidatedRequest


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass(frozen=True)
class PrefillEvent:
    tokens: list[Token]  # the prompt, first logprob None (NaN)


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token]


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


@dataclass(frozen=True)
class ErrorEvent:
    error: InferError


Event = PrefillEvent | TokenEvent | EndEvent | ErrorEvent


@dataclass(eq=False)
class Entry:
    id: int
    request: ValidatedRequest
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it joined a batch
    allocation: Allocation | None = None
    chunk_len: int | None = None  # prompt tokens of the first prefill, when the budget cut it
    cancelled: bool = False
    generated_ids: list[int] = field(default_factory=list)
    output: object | None = None  # router.output.OutputState, made when the entry starts

    def send(self, event: Event) -> None:
        self.events.put_nowait(event)
