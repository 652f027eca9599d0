"""The load generator against stub servers of each dialect: tokens counted per streamed event,
TTFT and TPOT measured, errors counted; and the table's ratios."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmark.__main__ import Measured, grammar_table, table
from benchmark.loadgen import (
    Load,
    Report,
    request_body,
    run_load,
    sequential_ttfts,
    stall_under_long_prompt,
)

TOKENS = 5


def stub_app(sent: list[dict]) -> web.Application:
    async def sse(request: web.Request, events: list, done: bool) -> web.StreamResponse:
        sent.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await asyncio.sleep(0.01)
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if done:
            await response.write(b"data: [DONE]\n\n")
        return response

    async def tgi(request):
        return await sse(request, [{"token": {"id": i}} for i in range(TOKENS)], False)

    async def openai(request):
        chunks = [{"choices": [{"text": "x"}]} for _ in range(TOKENS)] + [{"choices": []}]
        return await sse(request, chunks, True)  # the last chunk is usage only

    async def llama(request):
        events = [{"content": "x", "stop": False} for _ in range(TOKENS)]
        return await sse(request, events + [{"content": "", "stop": True}], False)

    async def failing(request):
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_post("/generate_stream", tgi)
    app.router.add_post("/v1/completions", openai)
    app.router.add_post("/completion", llama)
    app.router.add_post("/fail/generate_stream", failing)
    return app


@pytest.mark.parametrize("dialect", ["tgi", "openai", "llama"])
def test_each_dialect_counts_one_token_per_event(dialect):
    async def main():
        sent: list[dict] = []
        async with TestServer(stub_app(sent)) as server:
            url = str(server.make_url("")).rstrip("/")
            report = await run_load(url, Load(2, 4, TOKENS, dialect), ["a", "b"])
        assert report.tokens == 4 * TOKENS and report.errors == 0
        assert len(report.ttft) == 4 and all(t > 0 for t in report.ttft)
        assert all(0.005 < t < 1 for t in report.tpot)
        assert all(body.get("ignore_eos") or body["parameters"]["ignore_eos"] for body in sent)
        assert report.tokens_per_second > 0

    asyncio.run(main())


def test_a_grammar_goes_with_every_tgi_request():
    grammar = {"type": "json", "value": {"type": "object", "properties": {}}}

    async def main():
        sent: list[dict] = []
        async with TestServer(stub_app(sent)) as server:
            url = str(server.make_url("")).rstrip("/")
            await run_load(url, Load(2, 3, TOKENS, "tgi", grammar), ["a"])
        assert [body["parameters"]["grammar"] for body in sent] == [grammar] * 3

    asyncio.run(main())
    with pytest.raises(ValueError, match="tgi dialect only"):
        request_body("llama", "a", 1, grammar)


def test_grammar_table_compares_time_per_token():
    plain = Report(Load(1, 1, 4), seconds=1.0, tokens=100, errors=0, ttft=[0.1], tpot=[0.010])
    constrained = Report(Load(1, 1, 4), 1.0, 90, 0, [0.1], [0.011])
    measured = {"ours": Measured(reports={1: plain}, grammar_reports={1: constrained})}
    row = grammar_table(measured, [1]).splitlines()[-1]
    assert row == "| ours | 1 | 100.0 | 90.0 | 10.0 ms | 11.0 ms | 1.10 |"


def test_errors_are_counted_not_timed():
    async def main():
        async with TestServer(stub_app([])) as server:
            url = str(server.make_url("/fail")).rstrip("/")
            report = await run_load(url, Load(1, 2, TOKENS, "tgi"), ["a"])
        assert report.errors == 2 and report.tokens == 0 and report.ttft == []

    asyncio.run(main())


def report(tokens_per_second: float, n: int) -> Report:
    return Report(Load(n, n, 8), 1.0, int(tokens_per_second), 0, [0.5], [0.01])


def test_table_gives_ratios_to_each_reference():
    results = {
        "ours": {1: report(100, 1), 16: report(300, 16)},
        "llama": {1: report(50, 1), 16: report(200, 16)},
        "naive": {1: report(20, 1)},
    }
    text = table(results, [1, 16], ["ours"], "llama", "naive")
    assert "| ours ÷ llama | 2.00× | 1.50× |" in text
    assert "| ours ÷ naive | 5.00× | — |" in text
    assert "| naive | 20.0 | — |" in text


def stalling_app() -> web.Application:
    """A TGI stub whose streams send a token every 10 ms, except that the prompt "long" stalls
    every stream for 80 ms while it is "prefilled", then gets its own first token."""
    stall_until = [0.0]

    async def tgi(request):
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        if body["inputs"] == "long":
            stall_until[0] = loop.time() + 0.08
            await asyncio.sleep(0.08)
        for i in range(body["parameters"]["max_new_tokens"]):
            await asyncio.sleep(max(0.01, stall_until[0] - loop.time()))
            await response.write(f"data: {json.dumps({'token': {'id': i}})}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/generate_stream", tgi)
    return app


def test_the_stall_measurement_sees_streams_wait_for_a_long_prompt():
    async def main():
        async with TestServer(stalling_app()) as server:
            url = str(server.make_url("")).rstrip("/")
            return await stall_under_long_prompt(
                url, "tgi", ["a"], "long", streams=2, max_new_tokens=40, after_tokens=5
            )

    report = asyncio.run(main())
    assert 4 < report.worst_wait_ratio < 15  # ~80 ms over ~10 ms
    assert 0.005 < report.median_tpot < 0.03
    assert report.long_prompt_ttft >= 0.08


def test_sequential_ttfts_times_each_prompt_in_turn():
    async def main():
        async with TestServer(stalling_app()) as server:
            url = str(server.make_url("")).rstrip("/")
            return await sequential_ttfts(url, "tgi", ["a", "long", "b"])

    first, long, last = asyncio.run(main())
    assert long > 0.08 > max(first, last)
