"""A shard failure reaches the real clients as their GenerationError (HTTP 424, or an error
event inside a stream), and the server keeps serving."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from router.text.tokenizer import Tokenizer
from tests.router.app_harness import RouterApp


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(autouse=True)
def fresh_hub_registry(monkeypatch):
    common = importlib.import_module("huggingface_hub.inference._common")
    monkeypatch.setattr(common, "_UNSUPPORTED_TEXT_GENERATION_KWARGS", {})


def test_generation_errors_reach_each_client(tokenizer):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import GenerationError as HubGenerationError
    from text_generation import Client
    from text_generation.errors import GenerationError

    def calls(url: str):
        hub = InferenceClient(url)  # kept alive: a collected client closes its open streams
        return [
            (GenerationError, lambda: Client(url).generate("hi", max_new_tokens=2)),
            (GenerationError, lambda: list(Client(url).generate_stream("hi", max_new_tokens=2))),
            (
                HubGenerationError,
                lambda: hub.text_generation("hi", max_new_tokens=2),
            ),
            (
                HubGenerationError,
                lambda: list(hub.text_generation("hi", max_new_tokens=2, stream=True)),
            ),
        ]

    async def main():
        async with RouterApp(tokenizer) as app:
            url = str(app.client.make_url("")).rstrip("/")
            for error, call in calls(url):
                app.shard.fail_next = "prefill"
                with pytest.raises(error, match="injected prefill failure"):
                    await asyncio.to_thread(call)
            import openai

            chat = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            app.shard.fail_next = "prefill"
            with pytest.raises(openai.APIStatusError) as err:
                await asyncio.to_thread(
                    lambda: chat.chat.completions.create(
                        model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                    )
                )
            assert err.value.status_code == 424
            out = await asyncio.to_thread(lambda: Client(url).generate("hi", max_new_tokens=2))
            assert out.details.generated_tokens == 2

    asyncio.run(asyncio.wait_for(main(), 60))
