"""Router startup and shutdown, in TGI's order: connect to the shards, ClearCache, Info,
Warmup (which sizes the KV cache and the token limits), and only then open the HTTP port.
On SIGTERM/SIGINT the port closes at once, in-flight requests finish (up to the graceful
timeout), then the process exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from pb import generate_pb2 as pb
from router.batcher import Batcher
from router.block_allocator import BlockAllocator
from router.client import ShardClient
from router.config import RouterConfig
from router.health import Health
from router.infer import Infer
from router.metrics import Metrics
from router.queue import Queue
from router.server import AppState, make_app
from router.tokenizer import Tokenizer
from router.validation import Validation

log = logging.getLogger(__name__)


def warmup_request(config: RouterConfig, max_input: int, max_total: int | None) -> pb.WarmupRequest:
    """Requests totalling max_batch_prefill_tokens, with every sampling option switched on so
    the shards' profile covers the costliest step (TGI's warmup batch)."""
    requests, left, i = [], config.max_batch_prefill_tokens, 0
    while left > 0 and (config.max_batch_size is None or i < config.max_batch_size):
        n = min(max_input, left)
        requests.append(
            pb.Request(
                id=i,
                inputs="_test " * n,
                input_ids=[0] * n,
                truncate=n,
                prefill_logprobs=True,
                top_n_tokens=20,
                parameters=pb.NextTokenChooserParameters(
                    temperature=0.9,
                    top_k=10,
                    top_p=0.9,
                    typical_p=0.9,
                    do_sample=False,
                    seed=0,
                    repetition_penalty=1.2,
                    frequency_penalty=0.1,
                    watermark=True,
                ),
                stopping_parameters=pb.StoppingCriteriaParameters(
                    max_new_tokens=2, ignore_eos_token=True
                ),
            )
        )
        left -= n
        i += 1
    return pb.WarmupRequest(
        batch=pb.Batch(id=0, requests=requests, size=len(requests)),
        max_input_tokens=config.max_input_tokens,
        max_prefill_tokens=config.max_batch_prefill_tokens,
        max_total_tokens=max_total,
    )


async def connect_shards(config: RouterConfig) -> tuple[ShardClient, RouterConfig, pb.InfoResponse]:
    client = await ShardClient.connect(config.master_shard_uds_path)
    await client.clear_cache(None)  # the router may have restarted
    info = await client.info()
    max_input = config.max_input_tokens or config.max_batch_prefill_tokens
    start = time.monotonic()
    answer = await client.warmup(warmup_request(config, max_input, config.max_total_tokens))
    log.info(
        "warmup done in %.1f s: %d KV tokens, max input %d, max total %d",
        time.monotonic() - start,
        answer.max_supported_total_tokens,
        answer.max_input_tokens,
        answer.max_total_tokens,
    )
    if answer.max_total_tokens > answer.max_supported_total_tokens:
        raise RuntimeError(
            f"Not enough memory to handle `max_total_tokens={answer.max_total_tokens}`"
        )
    if config.max_batch_total_tokens is not None:
        log.warning("--max-batch-total-tokens is ignored: the KV cache size comes from warmup")
    config = config.with_limits(
        answer.max_input_tokens, answer.max_total_tokens, answer.max_supported_total_tokens
    )
    return client, config, info


def build_state(config: RouterConfig, client: ShardClient, info: pb.InfoResponse):
    tokenizer = Tokenizer.from_dir(config.tokenizer_dir)
    allocator = BlockAllocator(config.max_batch_total_tokens // info.block_size, info.block_size)
    queue = Queue(allocator, info.support_chunking)
    batcher = Batcher(
        client,
        queue,
        allocator,
        tokenizer,
        config.max_batch_prefill_tokens,
        config.max_batch_total_tokens,
        config.max_batch_size,
        config.waiting_served_ratio,
        config.max_waiting_tokens,
    )
    executor = ThreadPoolExecutor(config.validation_workers, thread_name_prefix="tokenizer")
    validation = Validation(config, tokenizer, executor)
    infer = Infer(queue, tokenizer, config.max_concurrent_requests, config.max_total_tokens)
    liveness_id = next(iter(sorted(tokenizer.eos_token_ids)), 0)
    metrics = Metrics(config)
    metrics.watch(allocator, queue, batcher)
    state = AppState(
        config,
        validation,
        infer,
        tokenizer,
        Health(client, liveness_id, max(info.world_size, 1)),
        metrics,
    )
    return state, batcher


async def serve(config: RouterConfig) -> None:
    client, config, info = await connect_shards(config)
    state, batcher = build_state(config, client, info)
    batcher_task = asyncio.create_task(batcher.run(), name="batcher")
    runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.hostname, config.port)
    await site.start()
    log.info("Connected; listening on http://%s:%d", config.hostname, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await wait_for_stop_or_crash(stop, batcher_task)
    await drain(site, state.infer, config.graceful_shutdown_timeout)
    batcher_task.cancel()
    await runner.cleanup()
    await client.close()


async def wait_for_stop_or_crash(stop: asyncio.Event, batcher_task: asyncio.Task) -> None:
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_task, batcher_task}, return_when=asyncio.FIRST_COMPLETED)
    if batcher_task.done():
        stop_task.cancel()
        batcher_task.result()  # re-raises what killed the batching loop
        raise RuntimeError("the batching loop stopped")


async def drain(site: web.TCPSite, infer: Infer, timeout: float) -> None:
    """Stops accepting connections, then waits for in-flight requests to finish."""
    log.info("shutting down: %d requests in flight", infer.in_flight)
    await site.stop()
    deadline = time.monotonic() + timeout
    while infer.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if infer.in_flight:
        log.warning("graceful timeout: %d requests still in flight", infer.in_flight)
