"""What the queue and the batching loop report as they work. The batching package depends on
this interface only; `router.metrics.Metrics` implements it with TGI's Prometheus metrics."""

from __future__ import annotations

from router.batching.shard_client import StepResult


class Hooks:
    """What the queue and the batching loop report. This base does nothing, so the loop runs
    without metrics (unit tests); `Metrics` records them."""

    def batch_step(self, method: str, seconds: float, response: StepResult | None = None) -> None:
        """One Prefill/Decode call: `response` is the shard's answer (its forward_ns,
        decode_ns and concat_ns are read), None when the call failed."""

    def batch_current(self, size: int, max_tokens: int) -> None:
        """The running batch before a step; (0, 0) once it is done."""

    def batch_next(self, size: int) -> None:
        """A new batch left the queue with `size` requests."""

    def prefix_cache_hit(self, tokens: int) -> None:
        """A request joined a batch with `tokens` prompt tokens already in cached blocks."""

    def batch_concat(self, reason: str) -> None:
        """New requests joined the running batch: chunking, backpressure or wait_exceeded."""

    def batch_filter(self, method: str, seconds: float) -> None:
        """Time from a step's answer to the filtered batch (sending tokens, FilterBatch)."""

    def dropped(self, count: int = 1) -> None:
        """Requests whose client went away before they finished."""
