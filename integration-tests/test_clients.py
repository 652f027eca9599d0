"""The real TGI clients, unmodified, against the launched server: huggingface_hub's
InferenceClient / AsyncInferenceClient and TGI's own `text-generation` Client / AsyncClient."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from conftest import PROMPTS


@pytest.fixture(autouse=True)
def fresh_hub_registry(monkeypatch):
    """The hub remembers 'unsupported' kwargs process-wide; every test starts clean."""
    common = importlib.import_module("huggingface_hub.inference._common")
    monkeypatch.setattr(common, "_UNSUPPORTED_TEXT_GENERATION_KWARGS", {})


def test_text_generation_client(launcher, expected_greedy, tokenizer):
    from text_generation import Client

    client = Client(launcher.url, timeout=120)
    prompt = PROMPTS[3]
    response = client.generate(
        prompt, max_new_tokens=32, decoder_input_details=True, top_n_tokens=2
    )
    assert [t.id for t in response.details.tokens] == expected_greedy[prompt]
    assert response.generated_text == tokenizer.decode(
        expected_greedy[prompt], skip_special_tokens=True
    )
    assert [t.id for t in response.details.prefill] == tokenizer(prompt)["input_ids"]
    assert response.details.prefill[0].logprob is None
    assert all(len(top) == 2 for top in response.details.top_tokens)
    tokens = [r.token.id for r in client.generate_stream(prompt, max_new_tokens=32)]
    assert tokens == expected_greedy[prompt]


def until_stop(tokenizer, ids: list[int], stop: str) -> str:
    """The greedy text up to the token that completes `stop` (TGI keeps that whole token)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if stop in text:
            return text
    raise AssertionError(f"{stop!r} is not in the greedy answer")


def test_text_generation_async_client_and_stop(launcher, expected_greedy, tokenizer):
    from text_generation import AsyncClient

    async def main():
        client = AsyncClient(launcher.url, timeout=120)
        prompt = max(PROMPTS, key=lambda p: len(expected_greedy[p]))
        stop = tokenizer.decode(expected_greedy[prompt][4:6])  # in the answer, by construction
        expected = until_stop(tokenizer, expected_greedy[prompt], stop)
        response = await client.generate(prompt, max_new_tokens=32, stop_sequences=[stop])
        assert response.details.finish_reason.value == "stop_sequence"
        assert response.generated_text == expected
        tokens = [r.token.id async for r in client.generate_stream(PROMPTS[1], max_new_tokens=32)]
        assert tokens == expected_greedy[PROMPTS[1]]

    asyncio.run(main())


def test_seeded_sampling_is_reproducible_through_clients(launcher):
    from huggingface_hub import InferenceClient
    from text_generation import Client

    params = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.95, seed=7)
    hub = InferenceClient(launcher.url).text_generation(PROMPTS[6], details=True, **params)
    tgi = Client(launcher.url, timeout=120).generate(PROMPTS[6], **params)
    assert [t.id for t in hub.details.tokens] == [t.id for t in tgi.details.tokens]
    assert hub.details.seed == tgi.details.seed == 7


def test_async_inference_client(launcher, expected_greedy):
    from huggingface_hub import AsyncInferenceClient

    async def main():
        client = AsyncInferenceClient(launcher.url)
        prompt = PROMPTS[4]
        out = await client.text_generation(prompt, max_new_tokens=32, details=True)
        assert [t.id for t in out.details.tokens] == expected_greedy[prompt]
        stream = await client.text_generation(prompt, max_new_tokens=32, stream=True, details=True)
        assert [c.token.id async for c in stream] == expected_greedy[prompt]

    asyncio.run(main())


def test_validation_errors_map_to_each_clients_exception(launcher):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError as HubValidationError
    from text_generation import Client
    from text_generation.errors import ValidationError

    with pytest.raises(ValidationError, match="top_n_tokens"):
        Client(launcher.url, timeout=60).generate("hi", max_new_tokens=2, top_n_tokens=10)
    with pytest.raises(HubValidationError, match="top_n_tokens"):
        InferenceClient(launcher.url).text_generation("hi", max_new_tokens=2, top_n_tokens=10)
    with pytest.raises(ValidationError, match="top_n_tokens"):
        list(
            Client(launcher.url, timeout=60).generate_stream(
                "hi", max_new_tokens=2, top_n_tokens=10
            )
        )


def test_inference_client_all_generate_parameters(launcher, tokenizer):
    from huggingface_hub import InferenceClient

    client = InferenceClient(launcher.url)
    prompt = PROMPTS[5]
    out = client.text_generation(
        prompt, max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=3
    )
    assert [t.id for t in out.details.prefill] == tokenizer(prompt)["input_ids"]
    assert all(len(top) == 3 for top in out.details.top_tokens)
    best = client.text_generation(
        prompt, max_new_tokens=6, details=True, best_of=2, do_sample=True, temperature=0.9
    )
    assert len(best.details.best_of_sequences) == 1
    assert best.details.seed is not None
    sampled = client.text_generation(
        prompt,
        max_new_tokens=6,
        details=True,
        do_sample=True,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        top_k=20,
        top_p=0.9,
        typical_p=0.95,
        temperature=0.7,
        seed=5,
        truncate=4,
        watermark=True,
        stop=["\n\n"],
    )
    assert sampled.details.seed == 5
    finish, tokens = sampled.details.finish_reason, sampled.details.tokens
    if finish == "stop_sequence":
        assert "\n\n" in sampled.generated_text
    elif finish == "eos_token":
        assert tokens[-1].id == tokenizer.eos_token_id and len(tokens) <= 6
    else:
        assert finish == "length" and len(tokens) == 6 and "\n\n" not in sampled.generated_text
