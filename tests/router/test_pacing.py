"""The prefill pacer (router/batching/pacing.py) and its use by the batching loop.

Covered: with nothing decoding a step takes the whole prefill budget; before the costs are
measured the budget is MIN_CHUNK; the budget keeps a step within STALL_FACTOR decode steps under
the measured costs, clamped to [MIN_CHUNK, max_prefill_tokens]; a GPU-like cheap prompt token
gets the whole budget; against a fake shard whose steps cost time per prompt token, a long
prompt that arrives while a stream decodes is prefilled in chunks that keep each step near
STALL_FACTOR decode steps, and every step's budget reaches the shard.
"""

from __future__ import annotations

import asyncio

import pytest

from router.batching.events import EndEvent
from router.batching.pacing import MIN_CHUNK, STALL_FACTOR, PrefillPacer
from router.text.tokenizer import Tokenizer
from tests.router.test_batcher import Harness, request, run


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def test_nothing_decoding_takes_the_whole_budget():
    assert PrefillPacer(4096).budget(decoding=0) == 4096


def test_unmeasured_costs_give_the_smallest_chunk():
    pacer = PrefillPacer(4096)
    assert pacer.budget(decoding=3) == MIN_CHUNK
    pacer.observe(decode_tokens=3, prefill_tokens=0, seconds=0.03)
    assert pacer.budget(decoding=3) == MIN_CHUNK  # the cost of a prompt token is not known


def test_the_budget_keeps_a_step_within_the_stall_factor():
    pacer = PrefillPacer(4096)
    pacer.observe(decode_tokens=4, prefill_tokens=0, seconds=0.030)
    pacer.observe(decode_tokens=4, prefill_tokens=100, seconds=0.080)  # 0.5 ms per token
    tokens = pacer.budget(decoding=4)
    assert tokens == pytest.approx((STALL_FACTOR - 1) * 0.030 / 0.0005, abs=1)
    assert 0.030 + tokens * 0.0005 <= STALL_FACTOR * 0.030 + 1e-9


@pytest.mark.parametrize(
    "seconds, expected",
    [(0.030 + 100 * 0.1, MIN_CHUNK), (0.030 + 100 * 1e-7, 512)],  # very slow / GPU-like
)
def test_the_budget_is_clamped(seconds, expected):
    pacer = PrefillPacer(512)
    pacer.observe(decode_tokens=1, prefill_tokens=0, seconds=0.030)
    pacer.observe(decode_tokens=1, prefill_tokens=100, seconds=seconds)
    assert pacer.budget(decoding=1) == expected


def test_a_long_prompt_is_paced_beside_a_decoding_stream(tokenizer):
    step, per_token = 0.02, 0.001  # unpaced, a 400-token prompt would stall the stream 21x

    async def main():
        async with Harness(tokenizer, num_blocks=256, max_prefill=1024, step_delay=step) as h:
            h.client.token_delay = per_token
            streaming = asyncio.create_task(h.collect(request(5, 60)))
            await asyncio.sleep(10 * step)
            long = await h.collect(request(400, 2))
            assert isinstance(long[-1], EndEvent)
            assert isinstance((await streaming)[-1], EndEvent)
            mixed = [prefill for decode, prefill in h.client.steps if decode and prefill]
            assert len(mixed) >= 5  # the prompt was cut into chunks
            limit = 2 * (STALL_FACTOR - 1) * step / per_token  # twice the ideal chunk
            assert max(mixed[2:]) <= limit, mixed  # once the costs are measured
            assert h.client.budgets and min(h.client.budgets) >= MIN_CHUNK

    run(main())
