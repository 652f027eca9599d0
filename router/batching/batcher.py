"""The continuous-batching loop: one task owns the running batch, the shards and the blocks.

    wait for work -> Prefill(next batch) -> while a batch runs:
        drop entries whose client left (FilterBatch), then either
        Prefill(new entries, cached_batch=running)   when the queue has work that fits, or
        Decode(running)
With chunked prefill the shard merges a new batch into the running one and advances both in
one forward, so decoding requests never wait for a whole prompt: while requests decode, each
step's prompt tokens are capped by `PrefillPacer` (router/batching/pacing.py) so that the step
lasts at most about twice a decode step. Without chunking (TGI's older
rule) a new batch is prefilled alone once enough requests wait (`waiting_served_ratio`) or
the running batch has waited `max_waiting_tokens` steps, and the next Decode merges both.

The router's per-token work never leaves the shards idle: a step's outputs (detokenizing,
stop sequences, events to the clients) are handled while the shards compute the next step.
The requests the shards stopped (EOS, length) leave the batch before that next step; one that
a stop sequence ends is found a step later, computes one token nobody sees (its blocks still
hold it: a stop sequence ends a request before its last reserved position) and leaves then.

Blocks are freed in exactly one place, `_remove`, when an entry leaves the router.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from router.batching.block_allocator import BlockAllocator
from router.batching.entry import Entry
from router.batching.events import EndEvent, ErrorEvent
from router.batching.hooks import Hooks
from router.batching.pacing import PrefillPacer
from router.batching.queue import NextBatch, Queue
from router.batching.request_spans import batch_span
from router.batching.shard_client import (
    CachedBatch,
    NewRequest,
    ShardClient,
    ShardError,
    StepResult,
)
from router.errors import GenerationError

log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        client: ShardClient,
        queue: Queue,
        allocator: BlockAllocator,
        max_batch_prefill_tokens: int,
        max_batch_total_tokens: int,
        max_batch_size: int | None,
        waiting_served_ratio: float,
        max_waiting_tokens: int,
    ):
        self.client = client
        self.queue = queue
        self.allocator = allocator
        self.max_prefill = max_batch_prefill_tokens
        self.max_total = max_batch_total_tokens
        self.max_batch_size = max_batch_size
        self.waiting_served_ratio = waiting_served_ratio
        self.max_waiting_tokens = max_waiting_tokens
        self.entries: dict[int, Entry] = {}  # running entries by request id
        self.stopped: set[int] = set()  # entries the shards stopped, outputs not yet sent
        self.generating: set[int] = set()  # entries past their prompt (a token came)
        self.pacer = PrefillPacer(max_batch_prefill_tokens)
        self._pending: StepResult | None = None  # the last answer, its outputs not yet sent
        self._next_batch_id = 0
        self.healthy = True
        self.metrics: Hooks = Hooks()  # router.metrics.Metrics once watched
        self._answered: tuple[str, float] = ("prefill", 0.0)  # last step: method, when

    async def run(self) -> None:
        while True:
            await self.queue.notify.wait()
            self.queue.notify.clear()
            while batch := self._next(None, self.max_batch_size, self.max_prefill, self.max_total):
                cached = await self._prefill(batch, None)
                await self._drive(cached)

    async def _drive(self, cached: CachedBatch | None) -> None:
        """Runs one batch until it is empty, merging new work in as it comes."""
        waiting_tokens = 1  # steps since new requests last joined (without chunking)
        while cached is not None:
            cached = await self._filter(cached)
            if cached is None:
                break
            self.metrics.batch_current(cached.size, cached.max_tokens)
            max_size = None if self.max_batch_size is None else self.max_batch_size - cached.size
            token_budget = self.max_total - cached.max_tokens
            if self.queue.support_chunking:
                cached = await self._chunked_step(cached, max_size, token_budget)
            else:
                cached, waiting_tokens = await self._unchunked_step(
                    cached, max_size, token_budget, waiting_tokens
                )
        self._send_pending()
        self.metrics.batch_current(0, 0)

    async def _chunked_step(
        self, cached: CachedBatch, max_size: int | None, token_budget: int
    ) -> CachedBatch | None:
        """One forward: the running requests, and new ones when the queue has work that fits."""
        decoding = sum(1 for i in cached.request_ids if i in self.generating)
        budget = self.pacer.budget(decoding)
        # Prompts already being prefilled come first (the shards report their next chunks in
        # current_tokens); new requests take what is left.
        pending = min(max(cached.current_tokens - decoding, 0), budget)
        new = self._next(None, max_size, budget - pending, token_budget)
        if new is None:
            return await self._decode([cached], budget)
        self.metrics.batch_concat("chunking")
        return await self._prefill(new, cached, budget)

    async def _unchunked_step(
        self, cached: CachedBatch, max_size: int | None, token_budget: int, waiting_tokens: int
    ) -> tuple[CachedBatch | None, int]:
        """TGI's older rule: a new batch is prefilled alone once enough requests wait, or the
        running batch has waited long enough, and the next Decode merges both."""
        min_size = (
            None
            if waiting_tokens >= self.max_waiting_tokens
            else math.floor(cached.size * self.waiting_served_ratio)
        )
        new = self._next(min_size or None, max_size, self.max_prefill, token_budget)
        if new is not None:
            self.metrics.batch_concat("wait_exceeded" if min_size is None else "backpressure")
            new_cached = await self._prefill(new, None)
            if new_cached is not None:
                return await self._decode([cached, new_cached]), 1
            waiting_tokens = 1
        return await self._decode([cached]), waiting_tokens + 1

    def _next(self, min_size, max_size, prefill_budget, token_budget) -> NextBatch | None:
        return self.queue.next_batch(min_size, max_size, prefill_budget, token_budget)

    async def _prefill(
        self, batch: NextBatch, cached: CachedBatch | None, budget: int | None = None
    ):
        now = time.monotonic()
        for entry in batch.entries:
            entry.started_at = now
            entry.spans.started()
            self.entries[entry.id] = entry
        self._next_batch_id += 1
        batch_id = self._next_batch_id
        ids = [e.id for e in batch.entries] + (list(cached.request_ids) if cached else [])
        batch_ids = [batch_id] + ([cached.id] if cached else [])
        new = [NewRequest(e.id, e.request, e.allocation, e.chunk_len) for e in batch.entries]
        call = self.client.prefill(batch_id, new, cached, budget)
        links = [e.spans.link() for e in batch.entries]
        with batch_span("prefill", len(ids), links):  # the shards' spans are its children
            return await self._step("prefill", ids, batch_ids, call)

    async def _decode(self, batches: list[CachedBatch], budget: int | None = None):
        ids = [i for b in batches for i in b.request_ids]
        call = self.client.decode(batches, budget)
        with batch_span("decode", len(ids)):
            return await self._step("decode", ids, [b.id for b in batches], call)

    async def _step(self, method: str, request_ids: list[int], batch_ids: list[int], call):
        start = time.monotonic()
        step = asyncio.ensure_future(call)
        await _let_the_call_go_out()
        self._send_pending()  # the previous step's outputs, while the shards compute this one
        try:
            response = await step
        except ShardError as err:
            log.error("%s failed: %s", method, err)
            self.healthy = False
            self.metrics.batch_step(method, time.monotonic() - start)
            await self._fail(request_ids, batch_ids, f"Server error: {err}")
            return None
        self.healthy = True
        self._answered = (method, time.monotonic())
        self.metrics.batch_step(method, self._answered[1] - start, response)
        self.pacer.observe(
            response.decode_tokens, response.prefill_tokens, self._answered[1] - start
        )
        self.generating.update(g.request_id for g in response.generations)
        self.stopped.update(g.request_id for g in response.generations if g.finish_reason)
        self._pending = response
        return response.batch

    def _send_pending(self) -> None:
        if self._pending is not None:
            response, self._pending = self._pending, None
            self._send(response)

    def _send(self, response: StepResult) -> None:
        """Each generation's events to its entry; an entry that ended leaves the router."""
        for g in response.generations:
            entry = self.entries.get(g.request_id)
            if entry is None:
                continue
            if entry.cancelled:  # the client left during this step
                self._drop(entry)
                continue
            if not entry.output.generated_ids and entry.allocation is not None:
                # Its first token: the whole prompt's K/V is written, later prompts may share it.
                self.allocator.commit(entry.allocation, entry.request.input_ids)
            for event in entry.output.process(g, entry.queued_at, entry.started_at or 0.0):
                entry.send(event)
                if isinstance(event, EndEvent):
                    self._remove(entry)

    async def _fail(self, request_ids: list[int], batch_ids: list[int], message: str) -> None:
        """Every request of a failed step gets a generation error; the shards forget them."""
        for request_id in request_ids:
            entry = self.entries.get(request_id)
            if entry is not None:
                entry.send(ErrorEvent(GenerationError(message)))
                self._remove(entry, cache=False)
        for batch_id in batch_ids:
            try:
                await self.client.clear_cache(batch_id)
            except ShardError as err:
                log.error("clear_cache(%d) after a failed step failed too: %s", batch_id, err)

    async def _filter(self, cached: CachedBatch) -> CachedBatch | None:
        """_drop_finished, timed from the step's answer (tgi_batch_filter_duration)."""
        cached = await self._drop_finished(cached)
        method, answered = self._answered
        self.metrics.batch_filter(method, time.monotonic() - answered)
        return cached

    async def _drop_finished(self, cached: CachedBatch) -> CachedBatch | None:
        """Removes finished and cancelled requests from the shards' batch before the next step."""
        for request_id in cached.request_ids:
            entry = self.entries.get(request_id)
            if entry is not None and entry.cancelled:
                self._drop(entry)
        keep = [i for i in cached.request_ids if i in self.entries and i not in self.stopped]
        if len(keep) == len(cached.request_ids):
            return cached
        try:
            if not keep:
                await self.client.clear_cache(cached.id)
                return None
            return await self.client.filter_batch(cached.id, keep)
        except ShardError as err:
            await self._fail(keep, [cached.id], f"Server error: {err}")
            return None

    def _drop(self, entry: Entry) -> None:
        log.info("request %d: client went away, dropped", entry.id)
        self.metrics.dropped()
        self._remove(entry)

    def _remove(self, entry: Entry, cache: bool = True) -> None:
        """The one place an entry leaves the router and its blocks are freed; with `cache`,
        what it computed stays in the prefix cache (a later turn of the chat starts with it)."""
        self.entries.pop(entry.id, None)
        self.stopped.discard(entry.id)
        self.generating.discard(entry.id)
        if entry.allocation is not None:
            if cache:
                self.allocator.commit(entry.allocation, _computed_tokens(entry))
            self.allocator.free(entry.allocation)
            entry.allocation = None


def _computed_tokens(entry: Entry) -> tuple[int, ...]:
    """The tokens whose K/V the shards have surely written for the entry: the prompt and every
    generated token but the last (which was never fed back), once a first token came."""
    generated = entry.output.generated_ids
    return entry.request.input_ids + tuple(generated[:-1]) if generated else ()


async def _let_the_call_go_out() -> None:
    """Two turns of the event loop: one for the step's coroutine to create its gRPC calls, one
    for grpc.aio's tasks to send them. After that the shards are computing."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
