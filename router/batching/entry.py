"""A request in flight inside the router: its validated input, where its events go, its KV
blocks and the state of its output (detokenizer, stop sequences).

When the client goes away the handler sets `cancelled`; the batching loop then drops the entry
before the next step and frees its blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.batching.block_allocator import Allocation
from router.batching.events import Event
from router.batching.output import OutputState
from router.batching.request_spans import RequestSpans
from router.request import ValidatedRequest


@dataclass(eq=False)
class Entry:
    id: int
    request: ValidatedRequest
    output: OutputState
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it joined a batch
    allocation: Allocation | None = None
    chunk_len: int | None = None  # prompt tokens of the first prefill, when the budget cut it
    cancelled: bool = False
    spans: RequestSpans = field(default_factory=RequestSpans)  # queued, then infer

    def send(self, event: Event) -> None:
        self.events.put_nowait(event)
