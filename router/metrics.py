"""Prometheus metrics with TGI's names, types, labels and buckets (dashboards and autoscalers
scrape them), plus our KV cache gauges. One registry per router, served on `GET /metrics`.

Exposition: TGI renders through Rust's `metrics-exporter-prometheus`, whose counters carry no
`_total` suffix (`# TYPE tgi_request_count counter` / `tgi_request_count 5`), and which writes
no `_created` samples. prometheus-client's own `generate_latest` would write
`tgi_request_count_total`, so `render()` writes the text format itself from the registry's
samples: counters under their bare name, `_created` dropped, numbers formatted as Rust prints
f64 (`4`, not `4.0`). The metric objects stay ordinary prometheus-client ones.

Who reports what:
  * the HTTP handlers: `request_started`, `request_validated`, `request_succeeded`,
    `request_failed` (or `counting_failures()` around a block);
  * the queue and the batching loop, through the `Hooks` interface (a no-op base, so they run
    without metrics): `batch_step`, `batch_current`, `batch_next`, `batch_concat`,
    `batch_filter`, `dropped`;
  * live reads at scrape time: queue size and KV blocks (`watch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.batching.events import EndEvent
from router.batching.hooks import Hooks
from router.batching.shard_client import StepResult
from router.config import RouterConfig
from router.errors import InferError


def _duration_buckets() -> tuple[float, ...]:
    """TGI's 35 duration buckets: 0.0001 * 1.5^k for k = 1..35, multiplied step by step as
    TGI does, so the `le` values are the same floats."""
    value, buckets = 0.0001, []
    for _ in range(35):
        value *= 1.5
        buckets.append(value)
    return tuple(buckets)


def linear_buckets(limit: int | None) -> tuple[float, ...]:
    """TGI's 100 linear buckets up to `limit`; powers of two up to 2^16 when the limit is not
    known yet (a Metrics built without a config)."""
    if not limit:
        return tuple(float(2**k) for k in range(17))
    return tuple((limit / 100.0) * (x + 1) for x in range(100))


DURATION_BUCKETS = _duration_buckets()
BATCH_SIZE_BUCKETS = tuple(float(x + 1) for x in range(1024))
FAILURE_LABELS = {
    "validation": "validation",
    "overloaded": "overloaded",
    "generation": "generation",
    "template_error": "template",
}
ERR_LABELS = ("validation", "overloaded", "generation", "dropped", "incomplete")
METHODS = ("prefill", "decode")


def failure_label(err: InferError | str) -> str:
    """The `err` label of tgi_request_failure for an error (or its `error_type`)."""
    error_type = err if isinstance(err, str) else err.error_type
    return FAILURE_LABELS.get(error_type, error_type)


def _counter(name: str, doc: str, registry, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels, registry=registry)


def _histogram(name: str, doc: str, buckets, registry, labels: tuple[str, ...] = ()):
    return Histogram(name, doc, labels, buckets=buckets, registry=registry)


class Metrics(Hooks):
    """TGI's metric set on a registry of its own. `config` gives the token limits the
    length buckets need (TGI's linear buckets); without it they are powers of two."""

    def __init__(self, config: RouterConfig | None = None):
        r = self.registry = CollectorRegistry()
        self._request_metrics(r, config)
        self._batch_metrics(r)
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=r)
        self.blocks_free = Gauge("tgi_kv_cache_blocks_free", "Free KV cache blocks", registry=r)
        self.blocks_total = Gauge(
            "tgi_kv_cache_blocks_total", "KV cache blocks for requests", registry=r
        )
        # Not in TGI: what prefix caching keeps and saves.
        self.blocks_cached = Gauge(
            "tgi_kv_cache_blocks_cached",
            "Free KV cache blocks that keep a prefix for later prompts (counted as free)",
            registry=r,
        )
        self.prefix_cache_tokens = _counter(
            "tgi_prefix_cache_hit_tokens", "Prompt tokens whose prefill the prefix cache saved", r
        )
        if config is not None and config.max_batch_total_tokens:
            self.batch_max_total_tokens.set(config.max_batch_total_tokens)

    def _request_metrics(self, r: CollectorRegistry, config: RouterConfig | None) -> None:
        max_input = config.max_input_tokens if config else None
        max_total = config.max_total_tokens if config else None
        self.request_count = _counter("tgi_request_count", "Total number of requests", r)
        self.request_success = _counter("tgi_request_success", "Number of successful requests", r)
        self.request_failure = _counter(
            "tgi_request_failure", "Number of failed requests", r, ("err",)
        )
        for err in ERR_LABELS:
            self.request_failure.labels(err=err)
        self.request_duration = _histogram(
            "tgi_request_duration",
            "Total time spent processing the request",
            DURATION_BUCKETS,
            r,
        )
        self.validation_duration = _histogram(
            "tgi_request_validation_duration",
            "Time spent validating the request",
            DURATION_BUCKETS,
            r,
        )
        self.queue_duration = _histogram(
            "tgi_request_queue_duration", "Time spent in the queue per request", DURATION_BUCKETS, r
        )
        self.inference_duration = _histogram(
            "tgi_request_inference_duration", "Request inference duration", DURATION_BUCKETS, r
        )
        self.time_per_token = _histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean time per token per request",
            DURATION_BUCKETS,
            r,
        )
        self.generated_tokens = _histogram(
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            linear_buckets(max_total),
            r,
        )
        self.input_length = _histogram(
            "tgi_request_input_length",
            "Input token length per request",
            linear_buckets(max_input),
            r,
        )
        self.max_new_tokens = _histogram(
            "tgi_request_max_new_tokens",
            "Maximum new tokens per request",
            linear_buckets(max_total),
            r,
        )

    def _batch_metrics(self, r: CollectorRegistry) -> None:
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", registry=r)
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Maximum tokens for the current batch", registry=r
        )
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "Maximum tokens of all running batches", registry=r
        )
        self.next_size = _histogram(
            "tgi_batch_next_size", "Batch size of the next batch", BATCH_SIZE_BUCKETS, r
        )
        self.step_count = _counter(
            "tgi_batch_inference_count",
            "Inference calls per method (prefill or decode)",
            r,
            ("method",),
        )
        self.step_success = _counter(
            "tgi_batch_inference_success",
            "Number of successful inference calls per method (prefill or decode)",
            r,
            ("method",),
        )
        self.step_failure = _counter(
            "tgi_batch_inference_failure",
            "Number of failed inference calls per method (prefill or decode)",
            r,
            ("method",),
        )
        for method in METHODS:
            for counter in (self.step_count, self.step_success, self.step_failure):
                counter.labels(method=method)
        durations = {
            "inference": "Batch inference duration",
            "forward": "Batch forward duration per method (prefill or decode)",
            "decode": "Time spent decoding a batch per method (prefill or decode)",
            "filter": "Time spent filtering batches and sending generated tokens per method "
            "(prefill or decode)",
            "concat": "Time spent concatenating batches",
        }
        self.step_durations = {
            key: _histogram(f"tgi_batch_{key}_duration", doc, DURATION_BUCKETS, r, ("method",))
            for key, doc in durations.items()
        }
        self.concat = _counter("tgi_batch_concat", "Number of batch concatenations", r, ("reason",))

    def watch(self, allocator, queue, batcher) -> None:
        """Live gauges read at scrape time, and the hooks of the queue and the loop."""
        self.blocks_free.set_function(lambda: allocator.free_blocks)
        self.blocks_total.set_function(lambda: allocator.total_blocks)
        self.blocks_cached.set_function(lambda: allocator.cached_blocks)
        self.queue_size.set_function(lambda: len(queue))
        self.batch_max_total_tokens.set(batcher.max_total)
        queue.metrics = self
        batcher.metrics = self

    # -- the request path (HTTP handlers) ---------------------------------------------------

    def request_started(self) -> None:
        self.request_count.inc()

    def request_validated(self, input_length: int, max_new_tokens: int) -> None:
        self.input_length.observe(input_length)
        self.max_new_tokens.observe(max_new_tokens)

    def request_succeeded(
        self, end: EndEvent, received_at: float, validated_at: float, finished_at: float
    ) -> None:
        """TGI's timings: validation (received -> queued), queue (queued -> in a batch),
        inference (in a batch -> answered) and inference per generated token."""
        inference = max(finished_at - end.started_at, 0.0)
        self.request_success.inc()
        self.request_duration.observe(max(finished_at - received_at, 0.0))
        self.validation_duration.observe(max(validated_at - received_at, 0.0))
        self.queue_duration.observe(max(end.started_at - end.queued_at, 0.0))
        self.inference_duration.observe(inference)
        self.time_per_token.observe(inference / max(end.generated_tokens, 1))
        self.generated_tokens.observe(end.generated_tokens)

    def request_failed(self, err: InferError | str) -> None:
        """`err`: an error, or a label (validation, overloaded, generation, incomplete)."""
        self.request_failure.labels(err=failure_label(err)).inc()

    @contextmanager
    def counting_failures(self) -> Iterator[None]:
        """Counts an InferError raised inside the block in tgi_request_failure; re-raises."""
        try:
            yield
        except InferError as err:
            self.request_failed(err)
            raise

    # -- the queue and the batching loop (Hooks) --------------------------------------------

    def batch_step(self, method: str, seconds: float, response: StepResult | None = None) -> None:
        self.step_count.labels(method=method).inc()
        if response is None:
            self.step_failure.labels(method=method).inc()
            return
        self.step_success.labels(method=method).inc()
        d = self.step_durations
        d["inference"].labels(method=method).observe(seconds)
        d["forward"].labels(method=method).observe(response.forward_ns / 1e9)
        d["decode"].labels(method=method).observe(response.decode_ns / 1e9)
        if response.concat_ns is not None:  # TGI labels it "decode" for both methods
            d["concat"].labels(method="decode").observe(response.concat_ns / 1e9)

    def batch_current(self, size: int, max_tokens: int) -> None:
        self.batch_size.set(size)
        self.batch_max_tokens.set(max_tokens)

    def batch_next(self, size: int) -> None:
        self.next_size.observe(size)

    def prefix_cache_hit(self, tokens: int) -> None:
        self.prefix_cache_tokens.inc(tokens)

    def batch_concat(self, reason: str) -> None:
        self.concat.labels(reason=reason).inc()

    def batch_filter(self, method: str, seconds: float) -> None:
        self.step_durations["filter"].labels(method=method).observe(seconds)

    def dropped(self, count: int = 1) -> None:
        if count:
            self.request_failure.labels(err="dropped").inc(count)

    def render(self) -> bytes:
        return render(self.registry).encode()


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text format as TGI's exporter writes it (see the module docstring)."""
    lines = []
    for metric in registry.collect():
        lines.append(f"# HELP {metric.name} {_escape_help(metric.documentation)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            name = metric.name if metric.type == "counter" else sample.name
            lines.append(f"{name}{_labels(sample.labels)} {format_number(sample.value)}")
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = []
    for key, value in labels.items():
        if key == "le":
            value = format_number(float(value))
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        pairs.append(f'{key}="{value}"')
    return "{" + ",".join(pairs) + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_number(value: float) -> str:
    """A float as Rust's Display prints it: `4`, `0.5`, `0.00015000000000000001`, `+Inf`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    text = repr(value)
    return format(Decimal(text), "f") if "e" in text else text
