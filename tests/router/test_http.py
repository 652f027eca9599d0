"""HTTP routes over the fake shard: response shapes as TGI sends them."""

from __future__ import annotations

import asyncio
import json

import pytest

from router.text.tokenizer import Tokenizer
from tests.router.app_harness import RouterApp


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_generate_and_stream_shapes(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}
            response = await app.client.post("/generate", json=body)
            out = await response.json()
            assert response.status == 200
            assert list(out) == ["generated_text", "details"]
            assert out["details"]["finish_reason"] == "length"
            assert len(out["details"]["tokens"]) == 3
            response = await app.client.post("/generate_stream", json=body)
            text = await response.text()
            events = [json.loads(line[6:]) for line in text.split("\n\n") if line]
            assert [e["index"] for e in events] == [1, 2, 3]
            assert events[0]["generated_text"] is None and events[0]["details"] is None
            assert events[-1]["details"]["input_length"] == len(tokenizer.encode("Hello"))
            response = await app.client.post("/", json=body)
            assert isinstance(await response.json(), list)

    run(main())


def test_long_generations_continue_in_chunks_up_to_max_total_tokens(tokenizer):
    """max_new_tokens above 1024 (or absent) runs in 1024-token chunks and stops at
    max_total_tokens, as TGI; the client sees one answer."""

    async def main():
        async with RouterApp(tokenizer, num_blocks=1024, max_total_tokens=3000) as app:
            for params in ({"max_new_tokens": 100_000}, {}):
                body = {"inputs": "Hello", "parameters": {**params, "details": True}}
                out = await (await app.client.post("/generate", json=body)).json()
                input_length = len(tokenizer.encode("Hello"))
                assert out["details"]["generated_tokens"] == 3000 - input_length
                assert out["details"]["finish_reason"] == "length"
                assert len(out["details"]["tokens"]) == 3000 - input_length

    run(main())
