"""Prometheus metrics: TGI's exact names, TYPE lines, labels and buckets in the exposition,
and what the request path and the batching loop record (over the fake shard)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest

from router.config import RouterConfig
from router.metrics import DURATION_BUCKETS, Metrics, format_number
from router.text.tokenizer import Tokenizer
from tests.router.app_harness import RouterApp
from tests.router.test_batcher import Harness, request

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

COUNTERS = {
    "tgi_request_count": (),
    "tgi_request_success": (),
    "tgi_request_failure": ("err",),
    "tgi_batch_inference_count": ("method",),
    "tgi_batch_inference_success": ("method",),
    "tgi_batch_inference_failure": ("method",),
    "tgi_batch_concat": ("reason",),
}
GAUGES = [
    "tgi_queue_size",
    "tgi_batch_current_size",
    "tgi_batch_current_max_tokens",
    "tgi_batch_max_total_tokens",
    "tgi_kv_cache_blocks_free",
    "tgi_kv_cache_blocks_total",
]
HISTOGRAMS = [
    "tgi_request_duration",
    "tgi_request_validation_duration",
    "tgi_request_queue_duration",
    "tgi_request_inference_duration",
    "tgi_request_mean_time_per_token_duration",
    "tgi_request_generated_tokens",
    "tgi_request_input_length",
    "tgi_request_max_new_tokens",
    "tgi_batch_next_size",
    "tgi_batch_inference_duration",
    "tgi_batch_forward_duration",
    "tgi_batch_decode_duration",
    "tgi_batch_filter_duration",
    "tgi_batch_concat_duration",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Scrape:
    """A parsed exposition: TYPE lines and samples keyed by (name, sorted labels)."""

    def __init__(self, text: str):
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple, float] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                self.types[name] = kind
            elif line and not line.startswith("#"):
                name, labels, value = SAMPLE.match(line).groups()
                key = (name, tuple(sorted(LABEL.findall(labels or ""))))
                assert key not in self.samples, f"duplicate sample {line}"
                self.samples[key] = float(value)

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def get(self, name: str, **labels: str) -> float:
        """A labelled counter not yet incremented has no sample: 0."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def buckets(self, name: str, **labels: str) -> list[str]:
        wanted = set(labels.items())
        return [
            dict(key[1])["le"]
            for key in self.samples
            if key[0] == f"{name}_bucket" and wanted <= set(key[1])
        ]


async def scrape(app: RouterApp) -> Scrape:
    response = await app.client.get("/metrics")
    assert response.status == 200
    return Scrape(await response.text())


def test_exposition_has_tgi_names_and_types_without_total_or_created():
    metrics = Metrics()
    metrics.request_started()
    metrics.batch_concat("chunking")
    metrics.batch_filter("decode", 0.001)
    s = Scrape(metrics.render().decode())
    for name, labels in COUNTERS.items():
        assert s.types[name] == "counter"
        keys = {tuple(k for k, _ in key[1]) for key in s.samples if key[0] == name}
        assert keys == {labels}, name
    for name in GAUGES:
        assert s.types[name] == "gauge"
    for name in HISTOGRAMS:
        assert s.types[name] == "histogram"
    names = {name for name, _ in s.samples}
    assert not [n for n in names if n.endswith(("_total", "_created")) and n not in GAUGES]
    assert "# TYPE tgi_request_count counter\ntgi_request_count 1\n" in s.text
    assert s("tgi_batch_concat", reason="chunking") == 1
    for err in ("validation", "overloaded", "generation", "dropped", "incomplete"):
        assert s("tgi_request_failure", err=err) == 0  # present from the start
    for method in ("prefill", "decode"):
        assert s("tgi_batch_inference_count", method=method) == 0
    assert s("tgi_batch_filter_duration_count", method="decode") == 1


def test_buckets_are_tgis():
    config = RouterConfig(max_input_tokens=200, max_total_tokens=400, max_batch_total_tokens=4096)
    s = Scrape(Metrics(config).render().decode())
    durations = s.buckets("tgi_request_duration")
    assert len(durations) == 36 and durations[-1] == "+Inf"
    assert durations[0] == "0.00015000000000000001"  # 0.0001 * 1.5, as TGI computes it
    assert float(durations[-2]) == pytest.approx(0.0001 * 1.5**35)
    assert len(DURATION_BUCKETS) == 35
    assert s.buckets("tgi_request_input_length")[:3] == ["2", "4", "6"]
    assert s.buckets("tgi_request_input_length")[-2:] == ["200", "+Inf"]
    assert s.buckets("tgi_request_generated_tokens")[-2] == "400"
    assert s.buckets("tgi_request_max_new_tokens")[0] == "4"
    assert len(s.buckets("tgi_batch_next_size")) == 1025
    assert s("tgi_batch_max_total_tokens") == 4096
    generic = Scrape(Metrics().render().decode())  # limits unknown: powers of two
    assert generic.buckets("tgi_request_input_length")[:3] == ["1", "2", "4"]


def test_numbers_print_as_rust_does():
    assert format_number(4.0) == "4"
    assert format_number(0.5) == "0.5"
    assert format_number(1e-7) == "0.0000001"
    assert format_number(float("inf")) == "+Inf"
    assert format_number(float("nan")) == "NaN"


def test_requests_are_counted_by_outcome(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            ok = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
            for path in ("/generate", "/", "/generate_stream"):
                assert (await app.client.post(path, json=ok)).status == 200
            bad = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "temperature": -1}}
            assert (await app.client.post("/generate", json=bad)).status == 422
            text = await (await app.client.post("/generate_stream", json=bad)).text()
            assert "validation" in text  # sent inside the stream, still counted
            no_best_of = {"inputs": "Hello", "parameters": {"best_of": 2}}
            assert (await app.client.post("/generate_stream", json=no_best_of)).status == 422
            app.state.infer.max_concurrent_requests = 0
            assert (await app.client.post("/generate", json=ok)).status == 429
            text = await (await app.client.post("/generate_stream", json=ok)).text()
            assert "overloaded" in text
            s = await scrape(app)
            assert s("tgi_request_count") == 8
            assert s("tgi_request_success") == 3
            assert s("tgi_request_failure", err="validation") == 3
            assert s("tgi_request_failure", err="overloaded") == 2
            assert s("tgi_request_failure", err="generation") == 0
            for name in HISTOGRAMS[:6]:
                assert s(f"{name}_count") == 3, name
            assert s("tgi_request_generated_tokens_sum") == 9
            input_length = len(tokenizer.encode("Hello"))
            assert s("tgi_request_input_length_count") == 3
            assert s("tgi_request_input_length_sum") == 3 * input_length
            assert s("tgi_request_max_new_tokens_sum") == 9
            assert s("tgi_request_duration_bucket", le="+Inf") == 3

    run(main())


def test_batch_metrics_and_idle_gauges(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            calls = []
            for method in ("prefill", "decode"):
                real = getattr(app.shard, method)

                async def timed(*args, real=real):
                    response = await real(*args)
                    response = replace(response, forward_ns=2_000_000, decode_ns=500_000)
                    calls.append(response)
                    return response

                setattr(app.shard, method, timed)
            app.shard.step_delay = 0.005
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
            first = asyncio.create_task(app.client.post("/generate", json=body))
            await asyncio.sleep(0.02)  # the others join the running batch
            responses = await asyncio.gather(
                first, *(app.client.post("/generate", json=body) for _ in range(2))
            )
            assert all(r.status == 200 for r in responses)
            s = await scrape(app)
            steps = 0
            for method in ("prefill", "decode"):
                n = s("tgi_batch_inference_count", method=method)
                assert n >= 1 and s("tgi_batch_inference_success", method=method) == n
                assert s("tgi_batch_inference_failure", method=method) == 0
                assert s("tgi_batch_inference_duration_count", method=method) == n
                assert s("tgi_batch_forward_duration_sum", method=method) == pytest.approx(
                    0.002 * n
                )
                assert s("tgi_batch_decode_duration_sum", method=method) == pytest.approx(
                    0.0005 * n
                )
                steps += n
            assert steps == len(calls)
            assert s("tgi_batch_filter_duration_count", method="decode") >= 1
            assert s("tgi_batch_next_size_count") >= 1
            assert s("tgi_batch_next_size_sum") == 3  # every request left the queue once
            concats = s("tgi_batch_concat", reason="chunking")
            assert concats >= 1 and concats == s("tgi_batch_next_size_count") - 1
            assert s("tgi_batch_current_size") == 0  # idle again
            assert s("tgi_batch_current_max_tokens") == 0
            assert s("tgi_queue_size") == 0
            assert s("tgi_batch_max_total_tokens") == app.config.max_batch_total_tokens
            total = app.allocator.total_blocks
            assert s("tgi_kv_cache_blocks_total") == total
            assert s("tgi_kv_cache_blocks_free") == total

    run(main())


def test_gauges_while_a_batch_runs(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            app.shard.step_delay = 0.01
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 30}}
            task = asyncio.create_task(app.client.post("/generate", json=body))
            await asyncio.sleep(0.1)
            s = await scrape(app)
            assert s("tgi_batch_current_size") == 1
            assert s("tgi_batch_current_max_tokens") > 0
            assert s("tgi_kv_cache_blocks_free") < s("tgi_kv_cache_blocks_total")
            assert (await task).status == 200

    run(main())


def test_generation_failure_is_counted(tokenizer):
    async def main():
        async with RouterApp(tokenizer) as app:
            app.shard.fail_next = "decode"
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
            assert (await app.client.post("/generate", json=body)).status == 424
            app.shard.fail_next = "prefill"
            text = await (await app.client.post("/generate_stream", json=body)).text()
            assert "generation" in text
            s = await scrape(app)
            assert s("tgi_request_failure", err="generation") == 2
            assert s("tgi_batch_inference_failure", method="decode") == 1
            assert s("tgi_batch_inference_failure", method="prefill") == 1
            assert s("tgi_request_success") == 0
            assert s("tgi_batch_current_size") == 0

    run(main())


def watched(h: Harness) -> Metrics:
    metrics = Metrics()
    metrics.watch(h.allocator, h.queue, h.batcher)
    return metrics


def test_dropped_requests_are_counted_and_their_blocks_freed(tokenizer):
    """A client leaving while queued, while running, and during the batch's last step (its
    final generation must still free its blocks: Harness checks on exit)."""

    async def main():
        async with Harness(tokenizer, num_blocks=5, step_delay=0.02) as h:
            metrics = watched(h)
            first = asyncio.create_task(h.collect(request(8, 8)))  # takes every block
            await asyncio.sleep(0.02)
            waiting = asyncio.create_task(h.collect(request(8, 8)))
            await asyncio.sleep(0.02)
            waiting.cancel()
            await first
            await asyncio.sleep(0.05)
            stream = h.infer.generate_stream(request(5, 3))
            await stream.__anext__()
            await stream.__anext__()  # tokens 1 and 2; the last decode is now in flight
            await stream.aclose()
            await asyncio.sleep(0.1)
            s = Scrape(metrics.render().decode())
            assert s("tgi_request_failure", err="dropped") == 2
            assert s("tgi_batch_current_size") == 0

    run(main())


def test_concat_reasons_without_chunking(tokenizer):
    async def main():
        async with Harness(tokenizer, chunking=False, step_delay=0.005) as h:
            metrics = watched(h)
            running = asyncio.create_task(h.collect(request(4, 40)))
            await asyncio.sleep(0.03)
            await h.collect(request(4, 3))
            await running
            s = Scrape(metrics.render().decode())
            assert s("tgi_batch_concat", reason="backpressure") == 1
            assert s.get("tgi_batch_concat", reason="chunking") == 0
            assert s("tgi_batch_next_size_count") == 2

    run(main())


def test_prometheus_port_serves_the_registry_on_any_path_and_skips_a_taken_port(tokenizer):
    """TGI's --prometheus-port; a port already in use is logged, never fatal."""
    import socket

    import aiohttp

    from router.http.prometheus_port import start_metrics_port

    async def main():
        async with RouterApp(tokenizer, compute_type="2-cpu") as app:
            ok = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            response = await app.client.post("/generate", json=ok)
            assert response.headers["x-compute-type"] == "2-cpu"  # COMPUTE_TYPE
            response = await app.client.post("/generate_stream", json=ok)
            assert response.headers["x-compute-type"] == "2-cpu"
            await response.read()
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = taken.getsockname()[1]
                assert await start_metrics_port(app.metrics, "127.0.0.1", busy) is None
            runner = await start_metrics_port(app.metrics, "127.0.0.1", 0)
            port = runner.addresses[0][1]
            try:
                async with aiohttp.ClientSession() as session:
                    for path in ("/metrics", "/", "/anything"):
                        async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                            text = await r.text()
                            assert r.status == 200 and r.content_type == "text/plain"
                            assert "tgi_request_success 2" in text
            finally:
                await runner.cleanup()

    run(main())
