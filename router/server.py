"""The router process, start to end, in TGI's order: connect to the shards, ClearCache, Info,
Warmup (which sizes the KV cache and the token limits), build the engine, and only then open
the HTTP port. On SIGTERM/SIGINT the server drains (no new request, in-flight ones finish up to
the graceful timeout) with the batching loop still running; then the loop stops and the
process exits."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from common.tracing import setup_tracing
from router.batching.batcher import Batcher
from router.batching.block_allocator import BlockAllocator
from router.batching.health import Health
from router.batching.infer import Infer
from router.batching.queue import Queue
from router.batching.shard_client import ShardClient, ShardInfo
from router.config import RouterConfig
from router.http.server import HttpServer
from router.http.state import AppState
from router.metrics import Metrics
from router.text.tokenizer import Tokenizer
from router.text.workers import start_workers, stop_workers, warm_up
from router.validation.validator import Validation

log = logging.getLogger(__name__)


async def connect_shards(config: RouterConfig) -> tuple[ShardClient, RouterConfig, ShardInfo]:
    client = await ShardClient.connect(config.master_shard_uds_path)
    await client.clear_cache(None)  # the router may have restarted
    info = await client.info()
    start = time.monotonic()
    answer = await client.warmup(
        max_input_tokens=config.max_input_tokens,
        max_prefill_tokens=config.max_batch_prefill_tokens,
        max_total_tokens=config.max_total_tokens,
        max_batch_size=config.max_batch_size,
        max_batch_total_tokens=config.max_batch_total_tokens,
    )
    # Block 0 is reserved (health checks, padding): requests can use the rest.
    usable = answer.max_supported_total_tokens - info.block_size
    log.info(
        "warmup done in %.1f s: %d KV tokens for requests, max input %d, max total %d",
        time.monotonic() - start,
        usable,
        answer.max_input_tokens,
        answer.max_total_tokens,
    )
    if answer.max_total_tokens > usable:
        raise RuntimeError(
            f"Not enough memory to handle `max_total_tokens={answer.max_total_tokens}`: "
            f"the KV cache holds {usable} tokens for requests"
        )
    if config.max_batch_total_tokens is not None and config.max_batch_total_tokens != usable:
        log.warning(
            "--max-batch-total-tokens %d: the KV cache holds %d (a CPU sizes it to the flag, "
            "within 30%% of free memory; a GPU by its memory)",
            config.max_batch_total_tokens,
            usable,
        )
    config = config.with_limits(answer.max_input_tokens, answer.max_total_tokens, usable)
    config = config.with_model(
        info.dtype,
        info.device_type,
        info.quantize,
        info.batch_invariant,
        info.kernel_build,
        info.model_implementation,
        info.kernels,
    )
    log.info("the model runs its %s implementation", info.model_implementation or "native")
    if info.kernels:
        log.info("CPU kernels: %s", info.kernels)
    log.info("serving %s weights in %s on %s", info.quantize, info.dtype, info.device_type)
    log.info("prefix caching: %s", "on" if info.use_prefix_caching else "off")
    return client, config, info


def build_state(
    config: RouterConfig, client: ShardClient, info: ShardInfo
) -> tuple[AppState, Batcher]:
    """The engine and what the handlers reach. `config.max_batch_total_tokens` is what
    requests can use; the allocator adds the reserved block 0."""
    tokenizer = Tokenizer.from_dir(config.tokenizer_dir, config.tokenizer_config_path)
    allocator = BlockAllocator(
        config.max_batch_total_tokens // info.block_size + 1,
        info.block_size,
        prefix_caching=info.use_prefix_caching,
    )
    queue = Queue(allocator, info.support_chunking)
    batcher = Batcher(
        client,
        queue,
        allocator,
        config.max_batch_prefill_tokens,
        config.max_batch_total_tokens,
        config.max_batch_size,
        config.waiting_served_ratio,
        config.max_waiting_tokens,
    )
    validation = Validation(config, tokenizer, start_workers(config.validation_workers))
    infer = Infer(queue, tokenizer, config.max_concurrent_requests, config.max_total_tokens)
    liveness_id = next(iter(sorted(tokenizer.eos_token_ids)), 0)
    metrics = Metrics(config)
    metrics.watch(allocator, queue, batcher)
    health = Health(client, liveness_id, info.world_size)
    return AppState(config, validation, infer, tokenizer, health, metrics), batcher


async def serve(config: RouterConfig) -> None:
    tracing = setup_tracing(config.otlp_endpoint, config.otlp_service_name)
    try:
        client, config, info = await connect_shards(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(config, client, info, stop)
        finally:
            await client.close()
    finally:
        tracing.shutdown()  # bounded: a collector that is down never holds the exit


async def run(config: RouterConfig, client: ShardClient, info: ShardInfo, stop: asyncio.Event):
    """Serves until `stop` is set (then drains) or the batching loop dies (then raises)."""
    state, batcher = build_state(config, client, info)
    batcher_task = asyncio.create_task(batcher.run(), name="batcher")
    http = HttpServer(state)
    try:
        await warm_up(state.validation.executor, state.tokenizer, config.validation_workers)
        # What start-up made (tokenizer, templates, modules) lives forever: keep the cyclic GC
        # from scanning it, or a full collection pauses every stream (as vLLM does).
        gc.freeze()
        await http.start()
        await _wait_for_stop_or_crash(stop, batcher_task)
        await http.drain(config.graceful_shutdown_timeout)
    finally:
        batcher_task.cancel()
        await asyncio.gather(batcher_task, return_exceptions=True)
        await http.close()
        stop_workers(state.validation.executor)


async def _wait_for_stop_or_crash(stop: asyncio.Event, batcher_task: asyncio.Task) -> None:
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, batcher_task}, return_when=asyncio.FIRST_COMPLETED)
    if batcher_task.done():
        stop_task.cancel()
        batcher_task.result()  # re-raises what killed the batching loop
        raise RuntimeError("the batching loop stopped")
