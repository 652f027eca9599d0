"""best_of over the fake shard: the copies, the choice by mean logprob, the JSON, the permits
and blocks, and TGI's validation messages."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import GenerationError
from router.text.tokenizer import Tokenizer
from router.validation.generate_request import parse_generate_request
from tests.router.app_harness import RouterApp
from tests.router.fake_shard import seed_logprob


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def body(**params) -> dict:
    return {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "do_sample": True, **params}}


def mean(sequence: dict) -> float:
    return sum(t["logprob"] for t in sequence["tokens"]) / len(sequence["tokens"])


def seeded_app(tokenizer, **config) -> RouterApp:
    app = RouterApp(tokenizer, **config)
    app.shard.seeded_logprobs = True
    return app


def assert_all_free(app: RouterApp) -> None:
    assert app.allocator.free_blocks == app.allocator.total_blocks
    assert app.state.infer.in_flight == 0


def test_best_of_returns_the_best_mean_logprob_and_the_others(tokenizer):
    async def main():
        async with seeded_app(tokenizer, max_best_of=4) as app:
            for _ in range(3):  # random seeds: a few draws
                response = await app.client.post("/generate", json=body(best_of=4, details=True))
                assert response.status == 200
                details = (await response.json())["details"]
                assert list(details) == [
                    "finish_reason",
                    "generated_tokens",
                    "seed",
                    "prefill",
                    "tokens",
                    "best_of_sequences",
                ]
                others = details["best_of_sequences"]
                assert len(others) == 3
                assert all(mean(details) >= mean(o) for o in others)
                seeds = [details["seed"], *(o["seed"] for o in others)]
                assert len(set(seeds)) == 4 and None not in seeds
                for sequence in (details, *others):  # the reported seed is the one used
                    assert mean(sequence) == pytest.approx(seed_logprob(sequence["seed"]))
                    assert len(sequence["tokens"]) == sequence["generated_tokens"] == 4
                assert_all_free(app)

    run(main())


def test_best_of_sequence_fields_full_text_and_top_tokens(tokenizer):
    async def main():
        async with seeded_app(tokenizer) as app:
            params = dict(best_of=2, details=True, decoder_input_details=True, top_n_tokens=2)
            response = await app.client.post("/", json=body(**params))  # full text by default
            [out] = await response.json()
            [other] = out["details"]["best_of_sequences"]
            assert list(other) == [
                "generated_text",
                "finish_reason",
                "generated_tokens",
                "seed",
                "prefill",
                "tokens",
                "top_tokens",
            ]
            assert out["generated_text"].startswith("Hello")
            assert other["generated_text"].startswith("Hello")
            assert other["finish_reason"] == "length"
            assert other["prefill"] == out["details"]["prefill"]  # the fake shard sends none
            assert len(other["top_tokens"]) == 4
            assert_all_free(app)

    run(main())


@pytest.mark.parametrize("params", [{"best_of": 1}, {"best_of": 0}, {}])
def test_no_best_of_sequences_without_best_of(tokenizer, params):
    async def main():
        async with RouterApp(tokenizer) as app:
            response = await app.client.post("/generate", json=body(details=True, **params))
            assert "best_of_sequences" not in (await response.json())["details"]

    run(main())


def test_best_of_without_details_has_no_details(tokenizer):
    async def main():
        async with seeded_app(tokenizer) as app:
            response = await app.client.post("/generate", json=body(best_of=2))
            assert list(await response.json()) == ["generated_text"]
            assert_all_free(app)

    run(main())


VALIDATION_CASES = [
    ("/generate_stream", body(best_of=2), "`best_of` != 1 is not supported when streaming tokens"),
    ("/", {**body(best_of=2), "stream": True}, "`best_of` != 1 is not supported when streaming"),
    ("/generate", body(best_of=2, do_sample=False), "you must use sampling when `best_of` is > 1"),
    ("/generate", body(best_of=2, seed=3), "`seed` must not be set when `best_of` > 1"),
    ("/generate", body(best_of=3), "`best_of` must be > 0 and <= 2. Given: 3"),
]


@pytest.mark.parametrize(("path", "payload", "message"), VALIDATION_CASES)
def test_validation_errors_keep_tgi_messages(tokenizer, path, payload, message):
    async def main():
        async with RouterApp(tokenizer) as app:
            response = await app.client.post(path, json=payload)
            assert response.status == 422
            out = await response.json()
            assert out["error_type"] == "validation"
            assert out["error"].startswith(f"Input validation error: {message}")
            assert_all_free(app)

    run(main())


def test_best_of_not_allowed_when_max_best_of_is_1(tokenizer):
    async def main():
        async with RouterApp(tokenizer, max_best_of=1) as app:
            out = await (await app.client.post("/generate", json=body(best_of=2))).json()
            assert out["error"] == (
                "Input validation error: `best_of` != 1 is not allowed for this endpoint"
            )

    run(main())


def test_each_copy_takes_a_permit_and_best_of_is_checked_first(tokenizer):
    """As in TGI, every copy is a request with its own permit; best_of limits are checked
    before any permit is taken (422 rather than 429 when both apply)."""

    async def main():
        async with seeded_app(tokenizer, max_best_of=3, max_concurrent_requests=2) as app:
            response = await app.client.post("/generate", json=body(best_of=3))
            assert response.status == 429
            assert (await response.json())["error_type"] == "overloaded"
            assert (await app.client.post("/generate", json=body(best_of=2))).status == 200
            permits = app.state.infer.acquire_many(2)
            response = await app.client.post("/generate", json=body(best_of=4))
            assert response.status == 422
            for permit in permits:
                permit.release()
            assert_all_free(app)

    run(main())


def test_shard_failure_fails_the_request(tokenizer):
    async def main():
        async with seeded_app(tokenizer) as app:
            app.shard.fail_next = "decode"
            response = await app.client.post("/generate", json=body(best_of=2))
            assert response.status == 424
            assert "injected decode failure" in (await response.json())["error"]
            assert_all_free(app)
            assert (await app.client.post("/generate", json=body(best_of=2))).status == 200

    run(main())


async def validated(app: RouterApp, **params):
    return await app.state.validation.validate(parse_generate_request(body(**params)))


def test_one_failing_copy_cancels_the_others(tokenizer):
    async def main():
        async with seeded_app(tokenizer) as app:
            app.shard.step_delay = 0.005
            infer = app.state.infer
            real_generate, calls = infer.generate, []

            async def generate(request):
                calls.append(request)
                if len(calls) == 2:
                    await asyncio.sleep(0.03)  # the first copy is decoding by now
                    raise GenerationError("Server error: copy failed")
                return await real_generate(request)

            infer.generate = generate
            request = await validated(app, best_of=2, max_new_tokens=300)
            with pytest.raises(GenerationError, match="copy failed"):
                await infer.generate_best_of(request, 2)
            await asyncio.sleep(0.05)  # the batcher drops the cancelled copy
            assert_all_free(app)

    run(main())


def test_cancelled_best_of_frees_every_copy(tokenizer):
    async def main():
        async with seeded_app(tokenizer, max_best_of=3) as app:
            app.shard.step_delay = 0.005
            request = await validated(app, best_of=3, max_new_tokens=300)
            task = asyncio.create_task(app.state.infer.generate_best_of(request, 3))
            await asyncio.sleep(0.05)
            assert app.allocator.free_blocks < app.allocator.total_blocks
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            assert_all_free(app)

    run(main())
