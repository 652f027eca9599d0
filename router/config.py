"""The router process's configuration: one frozen dataclass, built from the CLI and the
shards' Warmup answer, validated once and passed down."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RouterConfig:
    model_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer_dir: str = ""  # local directory with tokenizer.json (+ tokenizer_config.json)
    hostname: str = "0.0.0.0"
    port: int = 3000
    master_shard_uds_path: str = "/tmp/text-generation-server-0"
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None: the shards decide at warmup
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_client_batch_size: int = 4
    validation_workers: int = 2
    payload_limit: int = 2_000_000
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = field(default_factory=tuple)
    json_output: bool = False
    graceful_shutdown_timeout: float = 90.0
    enable_prefill_logprobs: bool = False
    disable_grammar_support: bool = False  # grammars (and tool calls) are a 422
    compute_type: str = "cpu"  # x-compute-type (COMPUTE_TYPE; the launcher sets {n}-{device})
    prometheus_port: int | None = None  # /metrics alone on this port too (the CLI: 9000)
    tokenizer_config_path: str | None = None  # replaces the model's tokenizer_config.json
    otlp_endpoint: str | None = None  # OTLP gRPC collector for traces
    otlp_service_name: str = "text-generation-inference.router"
    # A stream write that cannot finish for this long (the client stopped reading) drops the
    # connection, freeing the request's permit and KV blocks.
    stream_write_timeout: float = 60.0
    # What the shards serve, from their Info (shown in /info): filled in at start-up.
    model_dtype: str = ""
    model_device_type: str = ""
    quantize: str = ""
    batch_invariant: bool = False
    model_implementation: str = ""  # Info's: "native" or "transformers"
    kernels: str = ""  # Info's: how the CPU kernels were loaded
    system_fingerprint: str = ""  # OpenAI's: changes with what changes the numbers

    def __post_init__(self):
        checks = [
            (self.validation_workers > 0, "`validation_workers` must be > 0"),
            (
                self.max_batch_size is None or self.max_batch_size > 0,
                "`max_batch_size` must be > 0",
            ),
            (self.max_concurrent_requests > 0, "`max_concurrent_requests` must be > 0"),
            (
                self.max_input_tokens is None
                or self.max_total_tokens is None
                or self.max_input_tokens < self.max_total_tokens,
                "`max_input_tokens` must be < `max_total_tokens`",
            ),
            (
                self.max_batch_total_tokens is None
                or self.max_total_tokens is None
                or self.max_total_tokens <= self.max_batch_total_tokens,
                "`max_total_tokens` must be <= `max_batch_total_tokens`",
            ),
            (
                self.max_batch_total_tokens is None
                or self.max_batch_prefill_tokens <= self.max_batch_total_tokens,
                "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def with_model(
        self,
        dtype: str,
        device_type: str,
        quantize: str,
        batch_invariant: bool = False,
        kernel_build: str = "",
        model_implementation: str = "",
        kernels: str = "",
    ) -> RouterConfig:
        """The config once Info has told what the shards serve."""
        return replace(
            self,
            model_implementation=model_implementation,
            kernels=kernels,
            model_dtype=dtype,
            model_device_type=device_type,
            quantize=quantize,
            batch_invariant=batch_invariant,
            system_fingerprint=fingerprint(
                self.model_id, dtype, device_type, quantize, batch_invariant, kernel_build
            ),
        )

    def with_limits(
        self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int
    ) -> RouterConfig:
        """The config once Warmup has told the limits the shards can serve."""
        return replace(
            self,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_batch_total_tokens=max_batch_total_tokens,
        )


def fingerprint(model_id: str, *served: object) -> str:
    """OpenAI's `system_fingerprint` ("fp_" and 10 hex digits): a hash of what decides the
    numbers a request gets (the model, dtype, device, quantization, batch invariance and the
    shards' kernel build), so it changes exactly when the same request could change."""
    text = "\n".join(str(part) for part in (model_id, *served))
    return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:10]
