"""No request can hurt the others: every defect of the request-path issue, reproduced over HTTP
against a whole router app (real validation, tokenizer, queue, batcher) over the fake shard.
Each test failed before its fix."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import statistics
import time
from dataclasses import replace

import pytest

from router.batching.shard_client import Generation, ShardInfo, WarmupResult
from router.config import RouterConfig
from router.server import connect_shards, run
from router.text.tokenizer import Tokenizer
from router.text.workers import warm_up
from tests.router.app_harness import BLOCK_SIZE, RouterApp
from tests.router.fake_shard import FakeShardClient


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run_async(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def strict_json(text: str):
    """JSON as every other parser reads it: NaN and Infinity are not JSON."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def data_lines(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]


class TopTokensShard(FakeShardClient):
    """The fake shard, sending `top_n_tokens` alternatives with the given logprobs."""

    def __init__(self, *args, top_logprob: float = -1.0, token_logprob: float = -0.5, **kw):
        super().__init__(*args, **kw)
        self.top_logprob = top_logprob
        self.token_logprob = token_logprob

    def generation(self, r: dict) -> Generation:
        g = super().generation(r)
        n = self.requests[g.request_id].top_n_tokens
        top = tuple((self.vocab[i % len(self.vocab)], self.top_logprob) for i in range(n))
        return replace(g, logprob=self.token_logprob, top_tokens=top)


def use_shard(app: RouterApp, shard: FakeShardClient) -> FakeShardClient:
    app.shard = app.batcher.client = app.state.health.client = shard
    return shard


def server_address(app: RouterApp) -> tuple[str, int]:
    return app.client.server.host, app.client.server.port


# ---- numerics: parameters that cannot be computed ------------------------------------------


def test_a_temperature_or_penalty_too_small_to_divide_by_is_a_422(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            for name in ("temperature", "repetition_penalty"):
                params = {name: 1e-40, "do_sample": True, "max_new_tokens": 2}
                response = await app.client.post(
                    "/generate", json={"inputs": "Hello", "parameters": params}
                )
                out = await response.json()
                assert response.status == 422 and out["error_type"] == "validation"
                assert f"`{name}` must be at least" in out["error"]
                ok = {name: 1e-30, "do_sample": True, "max_new_tokens": 2}
                response = await app.client.post(
                    "/generate", json={"inputs": "Hello", "parameters": ok}
                )
                assert response.status == 200  # small but computable: the shard guards it
            assert app.shard.requests, "the computable ones reached the shard"

    run_async(main())


# ---- responses are JSON --------------------------------------------------------------------


def test_infinite_logprobs_are_valid_json_everywhere(tokenizer):
    """-inf (an impossible alternative) is null on TGI's routes, as serde writes it, and
    -9999.0 on the OpenAI routes, as vLLM writes it; never `-Infinity`."""

    async def main():
        async with RouterApp(tokenizer) as app:
            inf = float("-inf")
            use_shard(app, TopTokensShard(app.shard.vocab, top_logprob=inf, token_logprob=inf))
            params = {"max_new_tokens": 2, "top_n_tokens": 3, "details": True}
            body = {"inputs": "Hello", "parameters": params}
            out = strict_json(await (await app.client.post("/generate", json=body)).text())
            assert out["details"]["tokens"][0]["logprob"] is None
            assert out["details"]["top_tokens"][0][0]["logprob"] is None
            text = await (await app.client.post("/generate_stream", json=body)).text()
            events = [strict_json(line) for line in data_lines(text)]
            assert events[0]["token"]["logprob"] is None
            assert events[0]["top_tokens"][0]["logprob"] is None
            chat = {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "logprobs": True,
                "top_logprobs": 2,
            }
            out = strict_json(
                await (await app.client.post("/v1/chat/completions", json=chat)).text()
            )
            content = out["choices"][0]["logprobs"]["content"][0]
            assert content["logprob"] == -9999.0
            assert content["top_logprobs"][0]["logprob"] == -9999.0
            text = await (
                await app.client.post("/v1/chat/completions", json={**chat, "stream": True})
            ).text()
            assert all(line == "[DONE]" or strict_json(line) for line in data_lines(text))
            completion = {"prompt": "Hi", "max_tokens": 2, "logprobs": 2}
            out = strict_json(
                await (await app.client.post("/v1/completions", json=completion)).text()
            )
            assert out["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0, -9999.0]

    run_async(main())


# ---- the event loop never stalls ------------------------------------------------------------


def test_a_huge_prompt_never_freezes_the_other_streams(tokenizer):
    """A ~1.9 MB prompt is tokenized (with truncate, so it is valid and runs) and another is
    refused for its length, while a stream runs: no gap between that stream's events exceeds
    5x its median gap (tokenizing it holds no GIL)."""
    words = [f"w{i}x{i % 7}" for i in range(3000)]
    huge = " ".join(words[i * 7919 % 3000] for i in range(300_000))[:1_900_000]

    async def main():
        async with RouterApp(tokenizer, num_blocks=1024, worker_processes=True) as app:
            await warm_up(app.executor, tokenizer, 2)
            gc.freeze()  # as router.server.run does after start-up (here: pytest's and torch's
            # objects, whose full GC scans would otherwise pause the loop for ~0.3 s)
            app.shard.step_delay = 0.03  # 390 steps: ~12 s, longer than the huge prompts take
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 390}}
            arrivals: list[float] = []

            async def stream() -> None:
                response = await app.client.post("/generate_stream", json=body)
                async for line in response.content:
                    if line.startswith(b"data:"):
                        arrivals.append(time.perf_counter())

            streaming = asyncio.create_task(stream())
            while len(arrivals) < 5:
                await asyncio.sleep(0.01)
            truncated = {"inputs": huge, "parameters": {"max_new_tokens": 2, "truncate": 10}}
            too_long = {"inputs": huge, "parameters": {"max_new_tokens": 2}}
            done = await asyncio.gather(
                app.client.post("/generate", json=truncated),
                app.client.post("/generate", json=too_long),
            )
            assert [r.status for r in done] == [200, 422]
            assert "must be <= 400. Given: " in (await done[1].json())["error"]
            assert not streaming.done(), "the huge prompts were handled while streaming"
            await streaming
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            assert len(arrivals) == 390
            assert max(gaps) <= 5 * statistics.median(gaps), (max(gaps), statistics.median(gaps))

    try:
        run_async(main())
    finally:
        gc.unfreeze()


def test_tokenize_takes_a_permit(tokenizer):
    async def main():
        async with RouterApp(tokenizer, max_concurrent_requests=1) as app:
            app.shard.step_delay = 0.02
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 20}}
            busy = asyncio.create_task(app.client.post("/generate", json=body))
            while app.state.infer.in_flight == 0:
                await asyncio.sleep(0.005)
            response = await app.client.post("/tokenize", json={"inputs": "Hello"})
            assert response.status == 429
            assert (await busy).status == 200
            response = await app.client.post("/tokenize", json={"inputs": "Hello world"})
            assert [t["id"] for t in await response.json()] == tokenizer.encode("Hello world")
            assert app.state.infer.in_flight == 0

    run_async(main())


def test_encode_tail_agrees_with_encode(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = tokenizer.encode(text)
    assert tokenizer.encode_tail(text, True, None, 10_000) == (len(ids), ids)
    assert tokenizer.encode_tail(text, True, 7, 10) == (len(ids), ids[-7:])
    assert tokenizer.encode_tail(text, True, None, 10) == (len(ids), [])  # over the limit


# ---- chat --------------------------------------------------------------------------------


def test_a_chat_without_messages_is_a_422(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            for stream in (False, True):
                body = {"messages": [], "max_tokens": 2, "stream": stream}
                response = await app.client.post("/v1/chat/completions", json=body)
                out = await response.json()
                assert response.status == 422 and out["error_type"] == "validation"
                assert "`messages` cannot be empty" in out["error"]
            assert app.shard.requests == {}

    run_async(main())


# ---- clients that misbehave ---------------------------------------------------------------


def test_a_client_that_stops_reading_loses_its_stream_and_frees_everything(tokenizer):
    """A client that stops reading fills the socket buffers; the write that cannot finish
    within stream_write_timeout drops the connection, the request leaves the batch and its
    permit and blocks come back (before, the handler waited on the write forever)."""

    async def main():
        async with RouterApp(
            tokenizer,
            num_blocks=4096,
            max_total_tokens=16_000,
            max_top_n_tokens=64,
            stream_write_timeout=0.5,
        ) as app:
            use_shard(app, TopTokensShard(app.shard.vocab, num_blocks=4096))
            params = {"max_new_tokens": 15_000, "top_n_tokens": 64, "details": True}
            payload = json.dumps({"inputs": "Hello", "parameters": params}).encode()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server_address(app))
            sock.sendall(
                b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )  # and never read
            try:
                deadline = time.monotonic() + 60
                while app.state.infer.in_flight == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert app.state.infer.in_flight == 1
                while app.state.infer.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert app.state.infer.in_flight == 0, "the permit is still held"
                while app.batcher.entries and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert app.batcher.entries == {}
                decodes = sum(1 for call in app.shard.calls if call[0] == "decode")
                assert decodes < 14_000, "it left the batch long before its end"
                response = await app.client.post("/generate", json={"inputs": "Hi"})
                assert response.status == 200  # the others are served
            finally:
                sock.close()

    run_async(main())


def test_a_non_utf8_authorization_header_is_a_401(tokenizer):
    async def main():
        async with RouterApp(tokenizer, api_key="s3cret") as app:
            reader, writer = await asyncio.open_connection(*server_address(app))
            writer.write(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            await writer.drain()
            status = await reader.readline()
            writer.close()
            assert status.startswith(b"HTTP/1.1 401"), status

    run_async(main())


# ---- shutdown ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_serves_what_is_in_flight_and_nothing_new(tokenizer, smollm2_dir):
    """On SIGTERM (here the stop event): an idle keep-alive connection is closed, a stream in
    flight ends with its last token, and a request still uploading its body is served in
    full: the batching loop runs until every handler is done."""
    import aiohttp

    async def main():
        port = free_port()
        config = RouterConfig(
            tokenizer_dir=str(smollm2_dir),
            hostname="127.0.0.1",
            port=port,
            max_input_tokens=200,
            max_total_tokens=400,
            max_batch_total_tokens=512 * BLOCK_SIZE,
            max_batch_prefill_tokens=256,
            graceful_shutdown_timeout=30,
        )
        vocab = tokenizer.encode(" the quick brown fox", add_special_tokens=False)
        shard = FakeShardClient(vocab, block_size=BLOCK_SIZE, num_blocks=512, step_delay=0.02)
        stop = asyncio.Event()
        server = asyncio.create_task(run(config, shard, ShardInfo(BLOCK_SIZE, True, 1), stop))
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as idle, aiohttp.ClientSession() as busy:
            for _ in range(100):
                try:
                    assert (await idle.get(f"{url}/health")).status == 200  # kept alive
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 40}}
            streamed = await busy.post(f"{url}/generate_stream", json=body)
            first = await streamed.content.readline()
            assert first.startswith(b"data:")
            payload = json.dumps(body).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload[:10]
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientError):
                await idle.get(f"{url}/health")  # no new request is served
            writer.write(payload[10:])  # the upload ends during the drain
            await writer.drain()
            answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b"generated_text" in answer
            rest = (await streamed.content.read()).decode()
            last = json.loads(data_lines(first.decode() + rest)[-1])
            assert last["details"] is None and last["generated_text"] is not None
            assert last["index"] == 40
            writer.close()
        await asyncio.wait_for(server, 30)  # run() returns once drained

    run_async(main())


# ---- KV capacity ---------------------------------------------------------------------------


class WarmupShard(FakeShardClient):
    def __init__(self, answer: WarmupResult, **kw):
        super().__init__([1], block_size=BLOCK_SIZE, **kw)
        self.answer = answer

    async def warmup(self, **limits) -> WarmupResult:
        return self.answer


def test_the_capacity_promised_to_requests_leaves_out_block_0(monkeypatch):
    """16 blocks of 4 hold 64 positions, but block 0 is reserved: a shard that promises
    max_total_tokens=64 is refused at start-up (before, such a request failed at run time)."""

    async def connect(answer: WarmupResult):
        shard = WarmupShard(answer)

        async def fake_connect(cls, path, timeout=60.0):
            return shard

        monkeypatch.setattr(
            "router.batching.shard_client.ShardClient.connect", classmethod(fake_connect)
        )
        return await connect_shards(RouterConfig(max_batch_prefill_tokens=32))

    with pytest.raises(RuntimeError, match="Not enough memory"):
        run_async(connect(WarmupResult(64, 63, 64)))
    _, config, _ = run_async(connect(WarmupResult(64, 59, 60)))
    assert config.max_batch_total_tokens == 60
    assert config.max_total_tokens == 60
