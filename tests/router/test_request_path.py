"""Every generating route takes the one path of router/http/generation.py: TGI's request
metrics move for each of them, validation runs once per request, /invocations reaches the
route its body belongs to, and prompt logprobs follow --enable-prefill-logprobs."""

from __future__ import annotations

import asyncio
import re

import pytest

from router.text.tokenizer import Tokenizer
from tests.router.app_harness import RouterApp

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
PROMPTS = {"prompt": ["Hello", "Hi"], "max_tokens": 2}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def sample(app: RouterApp, name: str, **labels: str) -> float:
    text = app.metrics.render().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_openai_requests_count_in_tgi_request_metrics(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            for body, path in ((CHAT, "/v1/chat/completions"), (PROMPTS, "/v1/completions")):
                for stream in (False, True):
                    response = await app.client.post(path, json={**body, "stream": stream})
                    assert response.status == 200
                    await response.read()
            # 2 chat requests + 2 completions of 2 prompts each (a prompt is a request, as TGI)
            assert await sample(app, "tgi_request_count") == 6
            assert await sample(app, "tgi_request_success") == 6
            assert await sample(app, "tgi_request_generated_tokens_count") == 6
            too_long = {**CHAT, "max_tokens": 100_000}
            response = await app.client.post("/v1/chat/completions", json=too_long)
            assert response.status == 422
            assert await sample(app, "tgi_request_count") == 7
            assert await sample(app, "tgi_request_failure", err="validation") == 1

    run(main())


def test_validation_runs_once_per_request(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            calls = {"precheck": 0, "validate": 0}
            validation = app.state.validation
            precheck, validate = validation.precheck, validation.validate

            def counted_precheck(*args, **kwargs):
                calls["precheck"] += 1
                return precheck(*args, **kwargs)

            async def counted_validate(*args, **kwargs):
                calls["validate"] += 1
                return await validate(*args, **kwargs)

            validation.precheck, validation.validate = counted_precheck, counted_validate
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            for path in ("/generate", "/generate_stream", "/"):
                assert (await app.client.post(path, json=body)).status == 200
            assert (await app.client.post("/v1/chat/completions", json=CHAT)).status == 200
            assert calls == {"precheck": 4, "validate": 4}

    run(main())


def test_invocations_reaches_the_route_of_its_body(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            generate = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            out = await (await app.client.post("/invocations", json=generate)).json()
            assert isinstance(out, list) and "generated_text" in out[0]  # as POST /
            out = await (await app.client.post("/invocations", json=CHAT)).json()
            assert out["object"] == "chat.completion"
            out = await (await app.client.post("/invocations", json=PROMPTS)).json()
            assert out["object"] == "text_completion" and len(out["choices"]) == 2
            response = await app.client.post("/invocations", json={**generate, "stream": True})
            assert response.content_type == "text/event-stream"
            assert (await response.text()).count("data:") == 2
            response = await app.client.post("/invocations", json={"question": "?"})
            assert response.status == 422
            assert "SagemakerRequest" in await response.text()

    run(main())


@pytest.mark.parametrize("enabled", [False, True])
def test_prompt_logprobs_follow_enable_prefill_logprobs(tokenizer, enabled):
    """As TGI: decoder_input_details asks for prompt logprobs, which are computed only when the
    launcher has --enable-prefill-logprobs; otherwise `prefill` is []."""

    async def main():
        async with RouterApp(tokenizer, enable_prefill_logprobs=enabled) as app:
            params = {"max_new_tokens": 2, "decoder_input_details": True}
            response = await app.client.post(
                "/generate", json={"inputs": "Hello", "parameters": params}
            )
            out = await response.json()
            assert response.status == 200 and out["details"]["prefill"] == []  # fake shard
            sent = list(app.shard.requests.values())
            assert [r.prefill_logprobs for r in sent] == [enabled]

    run(main())


def test_ignore_eos_generates_past_eos_on_every_dialect(tokenizer):
    """`ignore_eos` (vLLM's extension; for benchmarks) reaches the shard as ignore_eos_token."""

    async def main():
        async with RouterApp(tokenizer) as app:
            params = {"max_new_tokens": 2, "ignore_eos": True}
            body = {"inputs": "Hello", "parameters": params}
            assert (await app.client.post("/generate", json=body)).status == 200
            chat = {**CHAT, "ignore_eos": True}
            assert (await app.client.post("/v1/chat/completions", json=chat)).status == 200
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            assert (await app.client.post("/generate", json=body)).status == 200
            sent = [r.stopping_parameters.ignore_eos_token for r in app.shard.requests.values()]
            assert sent == [True, True, False]

    run(main())
