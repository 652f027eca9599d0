"""An async, closed-loop load generator: `concurrency` clients each send their next request as
soon as the previous one ends, until `requests` have been sent. Every request streams; a
token is one streamed event with text (the three dialects send one event per token).

Dialects:
  tgi     POST /generate_stream  {"inputs", "parameters": {max_new_tokens, ignore_eos, ...}}
  openai  POST /v1/completions   {"prompt", "max_tokens", "stream": true, "ignore_eos"}
  llama   POST /completion       {"prompt", "n_predict", "stream": true, "ignore_eos"}
          (llama.cpp's llama-server)

`ignore_eos` makes every server generate exactly the tokens asked for, so they all do the
same work; it is meant for benchmarking.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Load:
    concurrency: int
    requests: int
    max_new_tokens: int
    dialect: str = "tgi"  # tgi | openai | llama
    grammar: dict | None = None  # TGI's `grammar` parameter on every request (tgi dialect)


@dataclass
class RequestResult:
    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class Report:
    load: Load
    seconds: float
    tokens: int
    errors: int
    ttft: list[float]  # seconds, one per request
    tpot: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, float]:
        return {
            "tok/s": self.tokens_per_second,
            "ttft_p50": self.percentile(self.ttft, 50),
            "ttft_p90": self.percentile(self.ttft, 90),
            "ttft_p99": self.percentile(self.ttft, 99),
            "tpot_p50": self.percentile(self.tpot, 50),
            "tpot_p90": self.percentile(self.tpot, 90),
        }


def request_body(
    dialect: str, prompt: str, max_new_tokens: int, grammar: dict | None = None
) -> tuple[str, dict]:
    if grammar is not None and dialect != "tgi":
        raise ValueError("grammars are sent in the tgi dialect only")
    if dialect == "tgi":
        params = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        if grammar is not None:
            params["grammar"] = grammar
        return "/generate_stream", {"inputs": prompt, "parameters": params}
    if dialect == "openai":
        body = {"model": "m", "prompt": prompt, "max_tokens": max_new_tokens, "stream": True}
        return "/v1/completions", {**body, "ignore_eos": True, "temperature": 0}
    if dialect == "llama":
        body = {"prompt": prompt, "n_predict": max_new_tokens, "stream": True}
        # cache_prompt (its default): a slot reuses the K/V of a prompt's start, as our prefix
        # cache does
        return "/completion", {**body, "ignore_eos": True, "cache_prompt": True}
    raise ValueError(f"unknown dialect {dialect!r}")


def is_token(dialect: str, event: dict) -> bool:
    """Whether a streamed event carries one generated token."""
    if "error" in event:
        raise RuntimeError(str(event["error"]))
    if dialect == "tgi":
        return "token" in event
    if dialect == "openai":
        return bool(event.get("choices"))
    return not event.get("stop", False)  # llama-server's last event only carries timings


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    dialect: str,
    prompt: str,
    max_new_tokens: int,
    result: RequestResult | None = None,
    grammar: dict | None = None,
) -> RequestResult:
    """Streams one request; `result` (filled as tokens arrive) may be watched meanwhile."""
    path, body = request_body(dialect, prompt, max_new_tokens, grammar)
    result = result or RequestResult(sent=time.perf_counter())
    try:
        async with session.post(url + path, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                if is_token(dialect, json.loads(line[5:])):
                    result.token_times.append(time.perf_counter())
    except (aiohttp.ClientError, RuntimeError) as err:
        result.error = str(err)
    return result


async def run_load(
    url: str, load: Load, prompts: list[str], progress: Callable[[int, int], None] | None = None
) -> Report:
    """Runs `load` against the server at `url`; `progress(done, total)` after each request."""
    results: list[RequestResult] = []
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    # A connection per request: llama-server closes a kept-alive connection after a stream,
    # which a reused one would meet as an error. Every server pays the same (~0.1 ms).
    connector = aiohttp.TCPConnector(limit=load.concurrency, force_close=True)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < load.requests:
            prompt = prompts[next_index % len(prompts)]
            next_index += 1
            results.append(
                await one_request(
                    session, url, load.dialect, prompt, load.max_new_tokens, grammar=load.grammar
                )
            )
            if progress is not None:
                progress(len(results), load.requests)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(load.concurrency)))
        seconds = time.perf_counter() - start
    ok = [r for r in results if r.error is None and r.token_times]
    return Report(
        load=load,
        seconds=seconds,
        tokens=sum(len(r.token_times) for r in ok),
        errors=len(results) - len(ok),
        ttft=[r.ttft for r in ok],
        tpot=[t for r in ok if (t := r.tpot) is not None],
    )


async def sequential_ttfts(
    url: str, dialect: str, prompts: list[str], max_new_tokens: int = 4
) -> list[float]:
    """The TTFT of each prompt, sent one after another on an idle server: with prompts that
    share a long start, the second one shows what a prefix cache saves."""
    ttfts = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(force_close=True)  # as in run_load
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for prompt in prompts:
            result = await one_request(session, url, dialect, prompt, max_new_tokens)
            if result.error is not None or not result.token_times:
                raise RuntimeError(f"shared-prefix request failed: {result.error}")
            ttfts.append(result.ttft)
    return ttfts


@dataclass(frozen=True)
class StallReport:
    """Running streams while a long prompt arrives: each stream's longest wait for a token
    after the prompt was sent, over its median time per output token."""

    worst_wait_ratio: float  # max over the streams of (longest gap) / (median gap)
    median_tpot: float  # seconds, median over the streams
    long_prompt_ttft: float  # seconds


async def stall_under_long_prompt(
    url: str,
    dialect: str,
    prompts: list[str],
    long_prompt: str,
    streams: int = 4,
    max_new_tokens: int = 160,
    after_tokens: int = 32,
) -> StallReport:
    """`streams` requests decode; once each has `after_tokens` tokens the long prompt is sent
    (8 new tokens). Gaps are measured on the running streams from then on."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        results = [RequestResult(sent=time.perf_counter()) for _ in range(streams)]
        running = [
            asyncio.create_task(
                one_request(session, url, dialect, prompts[i % len(prompts)], max_new_tokens, r)
            )
            for i, r in enumerate(results)
        ]
        while min(len(r.token_times) for r in results) < after_tokens:
            if any(r.error for r in results):
                break
            await asyncio.sleep(0.005)
        sent = time.perf_counter()
        long = await one_request(session, url, dialect, long_prompt, 8)
        await asyncio.gather(*running)
    failed = [r.error for r in [*results, long] if r.error or not r.token_times]
    if failed:
        raise RuntimeError(f"stall measurement failed: {failed[0]}")
    ratios, tpots = [], []
    for r in results:
        pairs = list(zip(r.token_times, r.token_times[1:]))
        median = sorted(b - a for a, b in pairs)[len(pairs) // 2]
        waits = [b - max(a, sent) for a, b in pairs if b > sent]
        tpots.append(median)
        ratios.append(max(waits, default=0.0) / median)
    return StallReport(max(ratios), sorted(tpots)[len(tpots) // 2], long.ttft)
