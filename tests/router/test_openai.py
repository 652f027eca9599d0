"""The OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models, /chat_tokenize) over
the fake shard: shapes, the ChatRequest -> GenerateParameters mapping, streams, errors, and the
real `openai` client parsing all of it."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from dataclasses import replace

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pb import generate_pb2 as pb
from router.batching.shard_client import Generation
from router.http.app import make_app
from router.text.tokenizer import Tokenizer
from tests.router.app_harness import BLOCK_SIZE, RouterApp
from tests.router.fake_shard import FakeShardClient

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "gpt-4o", "messages": HELLO, "max_tokens": 3}
EOS_ID = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class RecordingShard(FakeShardClient):
    """The fake shard, keeping every request it prefilled and sending top tokens when asked."""

    def generation(self, r: dict) -> Generation:
        g = super().generation(r)
        n = min(self.requests[g.request_id].top_n_tokens, len(self.vocab))
        top = tuple((self.vocab[i], -1.0 - i) for i in range(n))
        return replace(g, top_tokens=top)

    @property
    def last(self) -> pb.Request:
        return self.requests[max(self.requests)]


class OpenAIApp(RouterApp):
    """The router app with the OpenAI routes, over a RecordingShard."""

    def __init__(self, tokenizer, eos_id: int | None = None, step_delay: float = 0.0, **kw):
        super().__init__(tokenizer, **kw)
        shard = RecordingShard(
            self.shard.vocab,
            eos_id=eos_id,
            block_size=BLOCK_SIZE,
            num_blocks=self.shard.num_blocks,
            step_delay=step_delay,
        )
        self.shard = self.batcher.client = self.state.health.client = shard

    async def __aenter__(self) -> OpenAIApp:
        self.task = asyncio.create_task(self.batcher.run())
        app = make_app(self.state)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return self

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def post(self, path: str, body) -> tuple[int, object]:
        """(status, JSON body or list of SSE payloads, `[DONE]` kept as a string)."""
        response = await self.client.post(path, json=body)
        text = await response.text()
        if response.content_type == "text/event-stream":
            return response.status, sse_events(text)
        if response.content_type == "application/json":
            return response.status, json.loads(text)
        return response.status, text


def sse_events(text: str) -> list:
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def choice_chunks(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and e.get("choices")]


# ---- chat: shapes and mapping ----------------------------------------------------------------


def test_chat_response_shape_and_template(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            before = int(time.time())
            status, out = await app.post("/v1/chat/completions", CHAT)
            assert status == 200
            assert list(out) == [
                "id", "object", "created", "model", "system_fingerprint", "choices", "usage"
            ]  # fmt: skip
            assert out["id"] == "" and out["object"] == "chat.completion"
            assert before <= out["created"] <= int(time.time())
            assert out["model"] == app.config.model_id  # whatever the client named
            assert out["system_fingerprint"].endswith("-native")
            [choice] = out["choices"]
            assert list(choice) == ["index", "message", "logprobs", "finish_reason"]
            assert choice["index"] == 0 and choice["logprobs"] is None
            assert choice["finish_reason"] == "length"
            assert choice["message"]["role"] == "assistant"
            sent = app.shard.last
            rendered = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
            assert list(sent.input_ids) == tokenizer.encode(rendered, add_special_tokens=False)
            assert sent.inputs == rendered
            assert sent.stopping_parameters.max_new_tokens == 3
            generated = [app.shard.vocab[(sent.id + i) % len(app.shard.vocab)] for i in range(3)]
            assert choice["message"]["content"] == tokenizer.decode(generated)
            assert out["usage"] == {
                "prompt_tokens": len(sent.input_ids),
                "completion_tokens": 3,
                "total_tokens": len(sent.input_ids) + 3,
            }

    run(main())


def test_chat_content_parts_system_and_multi_turn(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            messages = [
                {"role": "system", "content": "Be brief.", "name": None},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                },
                {"role": "assistant", "content": "Hi!", "tool_calls": None},
                {"role": "user", "content": "Again"},
            ]
            status, _ = await app.post("/v1/chat/completions", {**CHAT, "messages": messages})
            assert status == 200
            expected = [
                {**m, "content": c}
                for m, c in zip(messages, ["Be brief.", "Hello", "Hi!", "Again"])
            ]
            rendered = tokenizer.apply_chat_template(expected, add_generation_prompt=True)
            assert app.shard.last.inputs == rendered
            assert "Be brief." in rendered and "You are a helpful" not in rendered

    run(main())


def sampling_of(app: OpenAIApp) -> pb.NextTokenChooserParameters:
    return app.shard.last.parameters


def test_chat_parameter_mapping(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:

            async def sent(**body) -> pb.Request:
                status, out = await app.post("/v1/chat/completions", {**CHAT, **body})
                assert status == 200, out
                return app.shard.last

            greedy = (await sent(temperature=0)).parameters
            assert not greedy.do_sample and greedy.temperature == 1.0
            default = (await sent()).parameters  # TGI: no temperature still samples
            assert default.do_sample and default.temperature == 1.0
            warm = (await sent(temperature=0.5, top_p=0.9, seed=7)).parameters
            assert warm.do_sample and math.isclose(warm.temperature, 0.5)
            assert math.isclose(warm.top_p, 0.9, rel_tol=1e-6) and warm.seed == 7
            assert (await sent(top_p=1.0)).parameters.top_p == 1.0  # accepted: "no top-p"
            assert (await sent(seed=-1)).parameters.seed == 2**64 - 1
            presence = (await sent(presence_penalty=0.5, frequency_penalty=0.25)).parameters
            assert math.isclose(presence.repetition_penalty, 2.5)  # TGI: p + 2.0
            assert math.isclose(presence.frequency_penalty, 0.25)
            extra = (await sent(top_k=5, repetition_penalty=1.3)).parameters  # openai extra_body
            assert extra.top_k == 5 and math.isclose(extra.repetition_penalty, 1.3, rel_tol=1e-6)
            alias = await sent(max_tokens=None, max_completion_tokens=2)
            assert alias.stopping_parameters.max_new_tokens == 2
            stop = await sent(stop="quick")
            assert list(stop.stopping_parameters.stop_sequences) == ["quick"]
            stops = await sent(stop=["a", "b"])
            assert list(stops.stopping_parameters.stop_sequences) == ["a", "b"]
            automatic = await sent(max_tokens=None)  # as many as fit, like /generate
            assert automatic.stopping_parameters.max_new_tokens == 400 - len(automatic.input_ids)

    run(main())


def test_chat_tolerates_nulls_and_unknown_keys(tokenizer):
    """The text-generation client's body: every optional field null, messages with nulls."""
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hello", "name": None, "tool_calls": None}],
        "repetition_penalty": None, "frequency_penalty": None, "logit_bias": None,
        "logprobs": None, "top_logprobs": None, "max_tokens": 2, "n": None,
        "presence_penalty": None, "stream": False, "seed": None, "temperature": None,
        "top_p": None, "tools": None, "tool_choice": None, "stream_options": None,
        "response_format": None, "user": "me", "service_tier": "auto", "n_": 3,
    }  # fmt: skip

    async def main():
        async with OpenAIApp(tokenizer) as app:
            status, out = await app.post("/v1/chat/completions", body)
            assert status == 200 and out["usage"]["completion_tokens"] == 2, out
            status, out = await app.post("/v1/chat/completions", {**body, "n": 1})
            assert status == 200
            tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            status, out = await app.post(
                "/v1/chat/completions", {**body, "tools": tools, "tool_choice": "auto"}
            )
            assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str)

    run(main())


def test_chat_stop_and_eos_finish_reasons(tokenizer):
    async def main():
        the, quick = tokenizer.encode(" the quick", add_special_tokens=False)
        async with OpenAIApp(tokenizer, vocab=[the, quick, EOS_ID], eos_id=EOS_ID) as app:
            status, out = await app.post("/v1/chat/completions", {**CHAT, "max_tokens": 10})
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop"  # eos_token, as TGI's format(true)
            assert "<|im_end|>" not in choice["message"]["content"]
            status, events = await app.post(
                "/v1/chat/completions", {**CHAT, "max_tokens": 10, "stream": True}
            )
            chunks = choice_chunks(events)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["choices"][0]["delta"]["content"] == ""  # the EOS token
        async with OpenAIApp(tokenizer) as app:
            status, out = await app.post(
                "/v1/chat/completions", {**CHAT, "max_tokens": 10, "stop": "quick"}
            )
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop"  # OpenAI's value for a stop sequence
            assert "quick" not in choice["message"]["content"]  # the stop text is left out

    run(main())


def test_stop_sequences_are_cut_out_of_openai_answers_and_kept_on_tgi_routes(tokenizer):
    """The stop text never reaches an OpenAI client, streamed or not, even when it spans
    tokens (the start of a possible match is held back); TGI's routes keep TGI's values."""
    stop = " quick br"  # spans the tokens " quick" and " brown"

    def expected(token_texts: list[str]) -> str:
        raw = "".join(token_texts)
        assert stop in raw
        return raw[: raw.index(stop)]

    async def main():
        async with OpenAIApp(tokenizer) as app:
            body = {**CHAT, "max_tokens": 12, "stop": stop, "logprobs": True}
            status, out = await app.post("/v1/chat/completions", body)
            choice = out["choices"][0]
            texts = [t["token"] for t in choice["logprobs"]["content"]]
            assert choice["finish_reason"] == "stop"
            assert choice["message"]["content"] == expected(texts)

            status, events = await app.post("/v1/chat/completions", {**body, "stream": True})
            chunks = choice_chunks(events)
            content = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
            texts = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks]
            assert content == expected(texts)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

            prompt = {"model": "m", "prompt": "Hello", "max_tokens": 12, "stop": [stop]}
            status, out = await app.post("/v1/completions", {**prompt, "logprobs": 0})
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop"
            assert choice["text"] == expected(choice["logprobs"]["tokens"])

            params = {"max_new_tokens": 12, "stop": [stop], "details": True}
            response = await app.client.post(
                "/generate", json={"inputs": "Hello", "parameters": params}
            )
            out = await response.json()
            assert out["details"]["finish_reason"] == "stop_sequence"  # TGI's value
            assert stop in out["generated_text"]  # TGI keeps the stop text

    run(main())


def test_chat_logprobs(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            body = {**CHAT, "logprobs": True, "top_logprobs": 2}
            status, out = await app.post("/v1/chat/completions", body)
            content = out["choices"][0]["logprobs"]["content"]
            assert len(content) == out["usage"]["completion_tokens"] == 3
            for item in content:
                assert list(item) == ["token", "logprob", "top_logprobs"]
                assert item["logprob"] == -0.5
                assert [t["logprob"] for t in item["top_logprobs"]] == [-1.0, -2.0]
                assert all(list(t) == ["token", "logprob"] for t in item["top_logprobs"])
            assert "".join(i["token"] for i in content) == out["choices"][0]["message"]["content"]
            assert app.shard.last.top_n_tokens == 2
            status, out = await app.post("/v1/chat/completions", {**CHAT, "logprobs": True})
            assert all(i["top_logprobs"] == [] for i in out["choices"][0]["logprobs"]["content"])
            status, events = await app.post("/v1/chat/completions", {**body, "stream": True})
            for chunk in choice_chunks(events):
                [item] = chunk["choices"][0]["logprobs"]["content"]
                assert len(item["top_logprobs"]) == 2

    run(main())


# ---- chat: streams ---------------------------------------------------------------------------


def test_chat_stream_sequence_and_usage(tokenizer):
    async def main():
        the = tokenizer.encode(" the", add_special_tokens=False)
        async with OpenAIApp(tokenizer, vocab=the) as app:
            status, full = await app.post("/v1/chat/completions", CHAT)
            body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            response = await app.client.post("/v1/chat/completions", json=body)
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            raw = await response.text()
            assert raw.endswith("data: [DONE]\n\n")
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            *chunks, usage_chunk, _ = events
            assert len(chunks) == 3
            for chunk in chunks:
                assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == ""
                assert chunk["model"] == app.config.model_id and chunk["usage"] is None
                assert chunk["choices"][0]["delta"]["role"] == "assistant"
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert reasons == [None, None, "length"]
            content = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
            assert content == full["choices"][0]["message"]["content"]
            assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
            status, events = await app.post("/v1/chat/completions", {**CHAT, "stream": True})
            assert len(events) == 4 and all(e == "[DONE]" or e["choices"] for e in events)

    run(main())


def test_stream_disconnect_frees_permits_and_blocks(tokenizer):
    """A client that leaves mid-stream: its requests leave the batch, permits come back."""

    async def main():
        async with OpenAIApp(tokenizer, step_delay=0.02) as app:
            chat = ("/v1/chat/completions", {**CHAT, "max_tokens": 300, "stream": True})
            prompts = {"prompt": ["Hello", "Hi"], "max_tokens": 300, "stream": True}
            for path, body, permits in [(*chat, 1), ("/v1/completions", prompts, 2)]:
                response = await app.client.post(path, json=body)
                assert (await response.content.readline()).startswith(b"data: {")
                assert app.state.infer.in_flight == permits
                response.close()
                for _ in range(250):
                    if app.state.infer.in_flight == 0 and not app.batcher.entries:
                        break
                    await asyncio.sleep(0.02)
                assert app.state.infer.in_flight == 0 and not app.batcher.entries
                assert app.allocator.free_blocks == app.allocator.total_blocks

    run(main())


# ---- chat: errors ----------------------------------------------------------------------------


def test_chat_errors_non_stream(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            status, out = await app.post("/v1/chat/completions", {**CHAT, "max_tokens": 1000})
            assert status == 422 and out["error_type"] == "validation"
            assert out["error"].startswith("Input validation error: `inputs` tokens + ")
            status, out = await app.post("/v1/chat/completions", {**CHAT, "top_logprobs": 6})
            assert status == 422
            assert out["error"].endswith("`top_n_tokens` must be >= 0 and <= 5. Given: 6")
            image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
            parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}]
            status, out = await app.post("/v1/chat/completions", {**CHAT, "messages": parts})
            assert (status, out) == (
                422,
                {
                    "error": "Input validation error: image modality is not supported",
                    "error_type": "validation",
                },
            )
            status, out = await app.post("/v1/chat/completions", {**CHAT, "n": 2})
            assert status == 422 and out["error_type"] == "validation" and "`n`" in out["error"]
            tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            for choice, detail in [
                ({"type": "function", "function": {"name": "g"}}, "Tool with name g not found"),
                ({"type": "function"}, "tool_choice must be"),
            ]:
                body = {**CHAT, "tools": tools, "tool_choice": choice}
                status, out = await app.post("/v1/chat/completions", body)
                assert status == 422 and out["error_type"] == "tool_error"
                assert detail in out["error"]
            bad_tools = [{"type": "function", "function": {"description": "no name"}}]
            status, out = await app.post("/v1/chat/completions", {**CHAT, "tools": bad_tools})
            assert status == 422 and "tools[0].function.name" in out["error"]
            both = {**CHAT, "tools": tools, "response_format": {"type": "json_object"}}
            status, out = await app.post("/v1/chat/completions", both)
            assert status == 422 and "mutually exclusive" in out["error"]
            for bad in ({"messages": 3}, {"model": "x"}, {**CHAT, "temperature": "hot"}):
                status, out = await app.post("/v1/chat/completions", bad)
                assert status == 422 and out.startswith("Failed to deserialize the JSON body")
            response = await app.client.post(
                "/v1/chat/completions", data=b"{", headers={"Content-Type": "application/json"}
            )
            assert response.status == 400
            assert not app.shard.requests and app.state.infer.in_flight == 0

    run(main())


def test_chat_template_error_is_422_even_when_streaming(tokenizer):
    broken = copy.copy(tokenizer)
    broken.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"

    async def main():
        async with OpenAIApp(tokenizer) as app:
            app.state.tokenizer = broken
            for stream in (False, True):
                body = {**CHAT, "stream": stream}
                status, out = await app.post("/v1/chat/completions", body)
                assert (status, out) == (
                    422,
                    {
                        "error": "Template error: Conversation roles must alternate",
                        "error_type": "template_error",
                    },
                )

    run(main())


def test_chat_stream_errors_are_in_band(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer, max_concurrent_requests=1) as app:
            body = {**CHAT, "stream": True, "max_tokens": 1000}
            status, events = await app.post("/v1/chat/completions", body)
            assert status == 200 and events[-1] == "[DONE]" and len(events) == 2
            error = events[0]["error"]
            assert error["http_status_code"] == 422
            assert error["message"].startswith("Input validation error: `inputs` tokens + ")
            held = app.state.infer.acquire()  # the only permit
            status, out = await app.post("/v1/chat/completions", CHAT)
            assert (status, out) == (
                429,
                {"error": "Model is overloaded", "error_type": "overloaded"},
            )
            status, events = await app.post("/v1/chat/completions", {**CHAT, "stream": True})
            assert status == 200
            assert events == [
                {"error": {"message": "Model is overloaded", "http_status_code": 429}},
                "[DONE]",
            ]
            held.release()
            app.shard.fail_next = "prefill"
            status, out = await app.post("/v1/chat/completions", CHAT)
            assert status == 424 and out["error_type"] == "generation"
            app.shard.fail_next = "prefill"
            status, events = await app.post("/v1/chat/completions", {**CHAT, "stream": True})
            assert events[-1] == "[DONE]" and events[-2]["error"]["http_status_code"] == 424
            assert events[-2]["error"]["message"].startswith("Request failed during generation")
            assert app.state.infer.in_flight == 0

    run(main())


# ---- completions -----------------------------------------------------------------------------

COMPLETION = {"model": "tgi", "prompt": "Hello", "max_tokens": 3}


def test_completion_shape_and_usage(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            status, out = await app.post("/v1/completions", COMPLETION)
            assert status == 200
            assert list(out) == [
                "id", "object", "created", "model", "system_fingerprint", "choices", "usage"
            ]  # fmt: skip
            assert out["object"] == "text_completion" and out["model"] == app.config.model_id
            [choice] = out["choices"]
            assert list(choice) == ["index", "text", "logprobs", "finish_reason"]
            assert choice["index"] == 0 and choice["finish_reason"] == "length"
            sent = app.shard.last
            assert list(sent.input_ids) == tokenizer.encode("Hello")  # special tokens added
            assert sent.parameters.do_sample  # no temperature: sampling, as TGI
            assert out["usage"] == {
                "prompt_tokens": len(sent.input_ids),
                "completion_tokens": 3,
                "total_tokens": len(sent.input_ids) + 3,
            }
            status, out = await app.post("/v1/completions", {**COMPLETION, "temperature": 0})
            assert not app.shard.last.parameters.do_sample

    run(main())


def test_completion_several_prompts_run_concurrently(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer, step_delay=0.02) as app:
            prompts = ["Hello", "The capital of France is", "Hi"]
            body = {**COMPLETION, "prompt": prompts, "max_tokens": 2}
            status, out = await app.post("/v1/completions", body)
            assert status == 200
            assert [c["index"] for c in out["choices"]] == [0, 1, 2]
            by_prompt = {r.inputs: r for r in app.shard.requests.values()}
            for prompt, choice in zip(prompts, out["choices"]):
                sent = by_prompt[prompt]
                ids = [app.shard.vocab[(sent.id + i) % len(app.shard.vocab)] for i in range(2)]
                assert choice["text"] == tokenizer.decode(ids)
            prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
            assert out["usage"] == {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 6,
                "total_tokens": prompt_tokens + 6,
            }
            ids = {r.id for r in app.shard.requests.values()}
            prefills = [c for c in app.shard.calls if c[0] == "prefill"]
            assert set().union(*(c[2] for c in prefills)) == ids
            # all three were in flight together: each later one joined the running batch
            assert all(cached is not None for *_, cached in prefills[1:])

    run(main())


def test_completion_echo_and_logprobs(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            body = {**COMPLETION, "prompt": ["Hello", "Hi"], "echo": True, "logprobs": 2}
            status, out = await app.post("/v1/completions", body)
            assert status == 200
            for prompt, choice in zip(["Hello", "Hi"], out["choices"]):
                assert choice["text"].startswith(prompt)
                logprobs = choice["logprobs"]
                assert list(logprobs) == ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
                assert len(logprobs["tokens"]) == 3 and logprobs["token_logprobs"] == [-0.5] * 3
                assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
                assert "".join(logprobs["tokens"]) == choice["text"][len(prompt) :]
                starts = [len(prompt)]
                for token in logprobs["tokens"][:-1]:
                    starts.append(starts[-1] + len(token))
                assert logprobs["text_offset"] == starts
            assert app.shard.last.top_n_tokens == 2

    run(main())


def test_completion_streams(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            prompts = ["Hello", "Hi"]
            body = {
                **COMPLETION,
                "prompt": prompts,
                "stream": True,
                "echo": True,
                "logprobs": 1,
                "stream_options": {"include_usage": True},
            }
            status, events = await app.post("/v1/completions", body)
            assert status == 200 and events[-1] == "[DONE]"
            *chunks, usage_chunk, _ = events
            texts = {0: "", 1: ""}
            for chunk in chunks:
                assert chunk["object"] == "text_completion"
                [choice] = chunk["choices"]
                texts[choice["index"]] += choice["text"]
            for index, prompt in enumerate(prompts):
                mine = [c for c in chunks if c["choices"][0]["index"] == index]
                assert mine[0]["choices"][0]["text"] == prompt  # echo first
                assert [c["choices"][0]["finish_reason"] for c in mine] == [None] * 3 + ["length"]
                assert [c["usage"] is not None for c in mine] == [False] * 3 + [True]
                assert mine[-1]["usage"]["completion_tokens"] == 3
                assert texts[index].startswith(prompt) and len(texts[index]) > len(prompt)
                offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in mine[1:]]
                assert offsets[0] == len(prompt)
            assert usage_chunk["choices"] == []
            assert usage_chunk["usage"]["completion_tokens"] == 6
            status, events = await app.post("/v1/completions", {**COMPLETION, "stream": True})
            assert len(events) == 4 and events[-2]["usage"]["completion_tokens"] == 3

    run(main())


def test_completion_errors(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer, max_concurrent_requests=2) as app:
            body = {**COMPLETION, "prompt": ["a"] * 5}
            for stream in (False, True):
                status, out = await app.post("/v1/completions", {**body, "stream": stream})
                assert (status, out) == (
                    422,
                    {
                        "error": "Number of prompts exceeds the maximum allowed batch size of 4",
                        "error_type": "batch size exceeded",
                    },
                )
            status, out = await app.post("/v1/completions", {**COMPLETION, "suffix": "!"})
            assert (status, out) == (
                422,
                {
                    "error": "Suffix is not supported and can be achieved by preprocessing "
                    "the prompt.",
                    "error_type": "suffix not supported",
                },
            )
            three = {**COMPLETION, "prompt": ["a", "b", "c"]}  # one permit each, 2 available
            status, out = await app.post("/v1/completions", three)
            assert status == 429 and out["error_type"] == "overloaded"
            status, events = await app.post("/v1/completions", {**three, "stream": True})
            assert events[0]["error"]["http_status_code"] == 429 and events[1] == "[DONE]"
            bad = {**COMPLETION, "prompt": ["Hello", ""]}
            status, out = await app.post("/v1/completions", bad)
            assert (
                status == 422 and out["error"] == "Input validation error: `inputs` cannot be empty"
            )
            status, events = await app.post("/v1/completions", {**bad, "stream": True})
            assert events[0]["error"]["http_status_code"] == 422 and len(events) == 2
            app.shard.fail_next = "prefill"
            status, out = await app.post("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]})
            assert status == 424 and out["error_type"] == "generation"
            status, out = await app.post("/v1/completions", {"prompt": [1, 2]})
            assert status == 422 and out.startswith("Failed to deserialize the JSON body")
            assert app.state.infer.in_flight == 0

    run(main())


# ---- models, chat_tokenize -------------------------------------------------------------------


def test_models_and_chat_tokenize(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            response = await app.client.get("/v1/models")
            model_id = app.config.model_id
            assert await response.json() == {
                "object": "list",
                "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}],
            }
            status, out = await app.post("/chat_tokenize", CHAT)
            assert status == 200 and list(out) == ["tokenize_response", "templated_text"]
            text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
            assert out["templated_text"] == text
            tokens = out["tokenize_response"]
            assert [t["id"] for t in tokens] == tokenizer.encode(text, add_special_tokens=False)
            assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens)
            assert "".join(t["text"] for t in tokens) == text
            status, _ = await app.post("/chat_tokenize", {"messages": 3})
            assert status == 422

    run(main())


# ---- the real openai client ------------------------------------------------------------------


def openai_sync_calls(url: str, model_id: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model="tgi", messages=HELLO, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.object == "chat.completion" and chat.model == model_id
    assert isinstance(chat.system_fingerprint, str) and isinstance(chat.created, int)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and len(choice.logprobs.content) == 3
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert chat.usage.completion_tokens == 3
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 3

    stream = client.chat.completions.create(
        model="tgi",
        messages=HELLO,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    chunks = list(stream)
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 4
    assert "".join(c.choices[0].delta.content for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3

    completion = client.completions.create(model="tgi", prompt=["Hello", "Hi"], max_tokens=2)
    assert completion.object == "text_completion"
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage.completion_tokens == 4
    streamed = list(
        client.completions.create(model="tgi", prompt="Hello", max_tokens=2, stream=True)
    )
    assert len(streamed) == 2 and streamed[-1].choices[0].finish_reason == "length"
    assert streamed[-1].usage.completion_tokens == 2

    assert [m.id for m in client.models.list()] == [model_id]

    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="tgi", messages=HELLO, max_tokens=1000)
    assert info.value.status_code == 422
    with pytest.raises(openai.APIError, match="Input validation error"):
        list(
            client.chat.completions.create(
                model="tgi", messages=HELLO, max_tokens=1000, stream=True
            )
        )


async def openai_async_calls(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tgi", messages=HELLO, max_tokens=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert len(chunks) == 3 and chunks[-1].choices[0].finish_reason == "length"
        completion = await client.completions.create(model="tgi", prompt="Hello", max_tokens=2)
        assert completion.choices[0].text
    finally:
        await client.close()


def test_openai_client_parses_everything(tokenizer):
    async def main():
        async with OpenAIApp(tokenizer) as app:
            await asyncio.to_thread(openai_sync_calls, app.url, app.config.model_id)
            await openai_async_calls(app.url)
            sent = [r for r in app.shard.requests.values() if r.parameters.top_k == 5]
            assert len(sent) == 1 and math.isclose(
                sent[0].parameters.repetition_penalty, 1.1, rel_tol=1e-6
            )
            assert app.state.infer.in_flight == 0

    run(main())


def test_routes_registered_once(tokenizer):
    app = make_app(RouterApp(tokenizer).state)
    paths = [(r.method, r.resource.canonical) for r in app.router.routes()]
    for route in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/chat_tokenize"),
        ("GET", "/v1/models"),
    ]:
        assert paths.count(route) == 1


def test_the_system_fingerprint_follows_what_decides_the_numbers():
    """OpenAI's system_fingerprint changes exactly when a request's numbers could: with the
    model, dtype, device, quantization, batch invariance and the shards' kernel build."""
    from router.config import RouterConfig

    base = ("float32", "cpu", "gguf", True, "k1")
    config = RouterConfig(model_id="m")
    first = config.with_model(*base).system_fingerprint
    assert first == config.with_model(*base).system_fingerprint
    assert first.startswith("fp_") and len(first) == 13
    for i, other in enumerate(("bfloat16", "cuda", "none", False, "k2")):
        changed = list(base)
        changed[i] = other
        assert config.with_model(*changed).system_fingerprint != first
    assert RouterConfig(model_id="other").with_model(*base).system_fingerprint != first
