"""OpenAI-style serving through the real clients, unmodified: the `openai` package and
huggingface_hub's chat_completion, against the launched server on the default model."""

from __future__ import annotations

import asyncio

import pytest
import requests

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def expected_chat(smollm2_dir, tokenizer) -> list[int]:
    """transformers' greedy answer to MESSAGES through the model's chat template."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def openai_client(launcher):
    import openai

    return openai.OpenAI(base_url=f"{launcher.url}/v1", api_key="unused", max_retries=0)


def test_openai_chat_greedy_matches_transformers(launcher, expected_chat, tokenizer):
    client = openai_client(launcher)
    out = client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=24, temperature=0
    )
    expected = tokenizer.decode(expected_chat, skip_special_tokens=True)
    assert out.choices[0].message.content == expected
    ended_by_eos = expected_chat[-1] == tokenizer.eos_token_id
    assert out.choices[0].finish_reason == ("stop" if ended_by_eos else "length")
    assert out.usage.completion_tokens == len(expected_chat)
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == len(expected_chat)


def test_openai_chat_logprobs_and_seed(launcher):
    client = openai_client(launcher)
    kwargs = dict(
        model="tgi",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.7,
        seed=3,
        logprobs=True,
        top_logprobs=2,
    )
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    content = first.choices[0].logprobs.content
    assert len(content) == first.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_openai_completions(launcher):
    client = openai_client(launcher)
    out = client.completions.create(
        model="tgi", prompt=["def fibonacci(n):", "Once upon a"], max_tokens=6, temperature=0
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.text for c in out.choices)
    stream = client.completions.create(
        model="tgi", prompt="def fibonacci(n):", max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    alone = next(c for c in out.choices if c.index == 0).text
    assert streamed == alone


def test_openai_errors(launcher):
    import openai

    client = openai_client(launcher)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=8, top_p=1.5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tgi", prompt=["a"] * 5, max_tokens=2)
    assert [m.id for m in client.models.list()] == [
        requests.get(f"{launcher.url}/info").json()["model_id"]
    ]


def test_hub_chat_completion(launcher, expected_chat, tokenizer):
    from huggingface_hub import AsyncInferenceClient, InferenceClient

    expected = tokenizer.decode(expected_chat, skip_special_tokens=True)
    client = InferenceClient(launcher.url)
    out = client.chat_completion(MESSAGES, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == expected
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat_completion(MESSAGES, max_tokens=24, temperature=0, stream=True)
    )
    assert text == expected

    async def main():
        async_client = AsyncInferenceClient(launcher.url)
        out = await async_client.chat_completion(MESSAGES, max_tokens=24, temperature=0)
        assert out.choices[0].message.content == expected

    asyncio.run(main())
