"""Prometheus metrics with TGI's names, types and labels (dashboards and autoscalers scrape
them), plus the KV cache gauges. One registry per router, served on `GET /metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(35))


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that succeeded", registry=r)
        self.request_failure = Counter(
            "tgi_request_failure", "Requests that failed", ["err"], registry=r
        )
        self.request_duration = Histogram(
            "tgi_request_duration", "Request duration (s)", buckets=DURATION_BUCKETS, registry=r
        )
        self.queue_duration = Histogram(
            "tgi_request_queue_duration", "Time in queue (s)", buckets=DURATION_BUCKETS, registry=r
        )
        self.input_length = Histogram(
            "tgi_request_input_length",
            "Prompt tokens",
            buckets=tuple(2**k for k in range(16)),
            registry=r,
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens",
            buckets=tuple(2**k for k in range(16)),
            registry=r,
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_size = Gauge(
            "tgi_batch_current_size", "Requests in the running batch", registry=r
        )
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV tokens of the running batch", registry=r
        )
        self.inference_duration = Histogram(
            "tgi_batch_inference_duration",
            "Prefill/decode step (s)",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.blocks_free = Gauge("tgi_kv_cache_blocks_free", "Free KV cache blocks", registry=r)
        self.blocks_total = Gauge(
            "tgi_kv_cache_blocks_total", "KV cache blocks for requests", registry=r
        )

    def watch(self, allocator, queue, batcher) -> None:
        """Gauges read live from the allocator, the queue and the batcher when scraped."""
        self.blocks_free.set_function(lambda: allocator.free_blocks)
        self.blocks_total.set_function(lambda: allocator.total_blocks)
        self.queue_size.set_function(lambda: len(queue))
        self.batch_size.set_function(lambda: len(batcher.entries))
        batcher.on_step = self.on_step

    def on_step(self, method: str, seconds: float, batch_size: int) -> None:
        self.inference_duration.labels(method=method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
