"""The router's queue, block accounting and batching loop against a fake shard (no model).
After every scenario, including cancellations and shard failures, every block is free again
(or cached: prefix caching is on, and the fake shard checks that every cached block it is
handed holds the prompt's tokens)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from router.batching.batcher import Batcher
from router.batching.block_allocator import BlockAllocator
from router.batching.events import EndEvent, ErrorEvent, TokenEvent
from router.batching.infer import Infer
from router.batching.queue import Queue
from router.errors import GenerationError
from router.request import SamplingParameters, StoppingParameters, ValidatedRequest
from router.text.tokenizer import Tokenizer
from tests.router.fake_shard import FakeShardClient

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def request(n_prompt: int, max_new: int, stops: tuple[str, ...] = ()) -> ValidatedRequest:
    return ValidatedRequest(
        inputs="x" * n_prompt,
        input_ids=tuple(range(100, 100 + n_prompt)),
        sampling=SamplingParameters(),
        stopping=StoppingParameters(max_new, max_new, stops),
    )


class Harness:
    def __init__(
        self,
        tokenizer,
        num_blocks=64,
        chunking=True,
        max_prefill=64,
        max_batch_size=None,
        vocab=None,
        step_delay=0.0,
        prefix_caching=True,
    ):
        vocab = vocab or tokenizer.encode(" the quick brown fox jumps", add_special_tokens=False)
        self.client = FakeShardClient(
            vocab,
            support_chunking=chunking,
            block_size=BLOCK_SIZE,
            num_blocks=num_blocks,
            step_delay=step_delay,
        )
        self.allocator = BlockAllocator(num_blocks, BLOCK_SIZE, prefix_caching)
        self.queue = Queue(self.allocator, chunking)
        self.batcher = Batcher(
            self.client,
            self.queue,
            self.allocator,
            max_prefill,
            num_blocks * BLOCK_SIZE,
            max_batch_size,
            1.2,
            20,
        )
        self.infer = Infer(self.queue, tokenizer, max_concurrent_requests=100)

    async def __aenter__(self):
        self.task = asyncio.create_task(self.batcher.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        assert self.allocator.free_blocks == self.allocator.total_blocks, "blocks leaked"
        assert self.batcher.entries == {}

    async def collect(self, req: ValidatedRequest) -> list:
        return [e async for e in self.infer.generate_stream(req)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_requests_run_to_completion_and_free_their_blocks(tokenizer):
    async def main():
        async with Harness(tokenizer) as h:
            results = await asyncio.gather(*(h.collect(request(5 + i, 3 + i)) for i in range(6)))
            for i, events in enumerate(results):
                assert all(isinstance(e, TokenEvent) for e in events[:-1])
                end = events[-1]
                assert isinstance(end, EndEvent) and end.finish_reason == "length"
                assert end.generated_tokens == 3 + i == len(events)
                ids = [e.token.id for e in events]
                assert end.generated_text == tokenizer.decode(ids, skip_special_tokens=True)

    run(main())


def test_prefill_budget_chunks_the_last_request(tokenizer):
    async def main():
        async with Harness(tokenizer, max_prefill=10) as h:
            h.client.step_delay = 0.01
            await asyncio.gather(*(h.collect(request(6, 2)) for _ in range(3)))
            prefills = [c for c in h.client.calls if c[0] == "prefill"]
            assert len(prefills[0][2]) == 2  # 6 tokens + a 4-token chunk of the second

    run(main())


def test_without_chunking_a_request_waits_for_budget(tokenizer):
    async def main():
        async with Harness(tokenizer, max_prefill=10, chunking=False) as h:
            await asyncio.gather(*(h.collect(request(6, 2)) for _ in range(3)))
            prefills = [c for c in h.client.calls if c[0] == "prefill"]
            assert all(len(p[2]) == 1 for p in prefills)
            assert all(p[3] is None for p in prefills)  # no chunking: Decode merges batches

    run(main())


def test_requests_wait_for_free_blocks(tokenizer):
    async def main():
        # 9 usable blocks; each request needs ceil((8 + 8 - 1) / 4) = 4 blocks: two at a time.
        async with Harness(tokenizer, num_blocks=10) as h:
            results = await asyncio.gather(*(h.collect(request(8, 8)) for _ in range(5)))
            assert all(isinstance(r[-1], EndEvent) for r in results)

    run(main())


def test_max_batch_size(tokenizer):
    async def main():
        async with Harness(tokenizer, max_batch_size=2, step_delay=0.005) as h:
            await asyncio.gather(*(h.collect(request(3, 4)) for _ in range(5)))
            assert (
                max(len(batch) for batch in h.client.batches.values()) <= 2
                if h.client.batches
                else True
            )

    run(main())


def test_cancelled_stream_is_filtered_out_and_freed(tokenizer):
    async def main():
        async with Harness(tokenizer, step_delay=0.005) as h:
            other = asyncio.create_task(h.collect(request(5, 30)))
            stream = h.infer.generate_stream(request(5, 200))
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()  # the client went away
            events = await other
            assert len(events) == 30
            assert any(c[0] == "filter" for c in h.client.calls)

    run(main())


def test_request_cancelled_while_queued_never_reaches_the_shard(tokenizer):
    async def main():
        async with Harness(tokenizer, num_blocks=5, step_delay=0.02) as h:
            first = asyncio.create_task(h.collect(request(8, 8)))  # takes every block
            await asyncio.sleep(0.02)
            waiting = asyncio.create_task(h.collect(request(8, 8)))
            await asyncio.sleep(0.02)
            waiting.cancel()
            await first
            await asyncio.sleep(0.05)
            prefilled = [i for c in h.client.calls if c[0] == "prefill" for i in c[2]]
            assert len(prefilled) == 1
            assert h.queue.dropped == 1

    run(main())


def test_shard_failure_fails_the_batch_and_the_server_keeps_serving(tokenizer):
    async def main():
        async with Harness(tokenizer, step_delay=0.002) as h:
            h.client.fail_next = "decode"
            results = await asyncio.gather(*(h.collect(request(4, 5)) for _ in range(3)))
            for events in results:
                assert isinstance(events[-1], ErrorEvent)
                assert isinstance(events[-1].error, GenerationError)
                assert "injected decode failure" in str(events[-1].error)
            assert any(c[0] == "clear" for c in h.client.calls)
            events = await h.collect(request(4, 5))
            assert isinstance(events[-1], EndEvent)

    run(main())


def test_stop_sequence_ends_the_request(tokenizer):
    async def main():
        vocab = tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
        async with Harness(tokenizer, vocab=vocab) as h:
            events = await h.collect(request(4, 50, stops=("gam",)))
            end = events[-1]
            assert end.finish_reason == "stop_sequence"
            assert "gam" in end.generated_text and end.generated_tokens < 50

    run(main())


def test_permits_are_released_however_requests_end(tokenizer):
    async def main():
        async with Harness(tokenizer) as h:
            h.infer.max_concurrent_requests = 2
            permits = [h.infer.acquire(), h.infer.acquire()]
            with pytest.raises(Exception) as err:
                h.infer.acquire()
            assert err.value.error_type == "overloaded"
            for p in permits:
                p.release()
                p.release()  # idempotent
            assert h.infer.in_flight == 0

    run(main())


def test_a_request_that_can_never_fit_fails_instead_of_blocking_the_queue(tokenizer):
    async def main():
        async with Harness(tokenizer, num_blocks=10) as h:
            too_big = await h.collect(request(8, 100))  # 27 blocks; the cache has 9
            assert isinstance(too_big[-1], ErrorEvent)
            assert "KV cache blocks" in str(too_big[-1].error)
            assert isinstance((await h.collect(request(4, 4)))[-1], EndEvent)

    run(main())


def test_the_next_step_is_sent_before_the_outputs_of_the_last_one(tokenizer):
    """The router's per-token work overlaps the shard: when step k+1 reaches the shard, the
    token of step k has not been sent to its client yet (it is, while the shard computes)."""

    async def main():
        async with Harness(tokenizer, step_delay=0.01) as h:
            delivered: list[int] = []  # tokens delivered when each decode reached the shard
            entries = h.batcher.entries
            decode = h.client.decode

            async def watched(batches, prefill_budget=None):
                (entry,) = entries.values()
                delivered.append(entry.events.qsize() + received[0])
                return await decode(batches, prefill_budget)

            h.client.decode = watched
            received = [0]
            events = []
            async for event in h.infer.generate_stream(request(5, 6)):
                events.append(event)
                received[0] += 1
            assert len(events) == 6
            # decode j (j = 1..5) runs while the token of step j - 1 is still being sent
            assert delivered == [0, 1, 2, 3, 4]

    run(main())


def test_a_stop_sequence_ends_the_request_a_step_later_without_leaking(tokenizer):
    async def main():
        the, quick = tokenizer.encode(" the quick", add_special_tokens=False)
        async with Harness(tokenizer, vocab=[the, quick]) as h:
            events = await h.collect(request(5, 10, stops=("quick",)))
            end = events[-1]
            assert isinstance(end, EndEvent) and end.finish_reason == "stop_sequence"
            assert end.generated_tokens == len(events) <= 3

    run(main())


def test_a_repeated_prompt_skips_its_cached_prefill(tokenizer):
    async def main():
        async with Harness(tokenizer) as h:
            first = await h.collect(request(10, 3))
            second = await h.collect(request(10, 3))
            ids = [r.id for r in h.client.requests.values()]
            assert [h.client.requests[i].cache_len for i in ids] == [0, 8]
            assert len(first) == len(second) == 3
            assert h.allocator.cached_blocks == 4  # 2 shared, then a block per (different) answer

    run(main())


def test_the_next_chat_turn_reuses_the_previous_answer(tokenizer):
    async def main():
        async with Harness(tokenizer) as h:
            events = await h.collect(request(6, 8))
            answer = tuple(e.token.id for e in events)
            turn = ValidatedRequest(
                inputs="x",
                input_ids=request(6, 8).input_ids + answer + (7, 7, 7),
                sampling=SamplingParameters(),
                stopping=StoppingParameters(2, 2),
            )
            await h.collect(turn)
            last = list(h.client.requests.values())[-1]
            assert last.cache_len == 12  # prompt + answer but its last token: 13 -> 3 blocks

    run(main())


def test_a_request_cancelled_during_its_prefill_caches_nothing(tokenizer):
    async def main():
        async with Harness(tokenizer, max_prefill=8, step_delay=0.1) as h:
            task = asyncio.create_task(h.collect(request(40, 4)))  # 2 prefill steps
            await asyncio.sleep(0.05)  # the first one is running
            task.cancel()
            await asyncio.sleep(0.3)
            assert h.client.calls[0][0] == "prefill"
            assert h.allocator.cached_blocks == 0

    run(main())


def test_prompt_logprobs_never_read_the_cache(tokenizer):
    async def main():
        async with Harness(tokenizer) as h:
            await h.collect(request(10, 2))
            await h.collect(replace(request(10, 2), prefill_logprobs=True))
            ids = list(h.client.requests)
            assert h.client.requests[ids[-1]].cache_len == 0

    run(main())
