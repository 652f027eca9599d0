"""The gRPC face of a shard: converts proto messages to domain objects and back, and runs
model work on one worker thread so the event loop keeps answering Health while a step runs.

An exception in an RPC fails that RPC (INVALID_ARGUMENT for a bad request, INTERNAL otherwise)
with the error's text; the shard keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from pb import generate_pb2 as pb
from pb import generate_pb2_grpc as pb_grpc
from shard.config import ShardConfig
from shard.engine.batch import Batch, InvalidRequest, request_from_pb
from shard.engine.batch_cache import BatchCache
from shard.engine.generator import Generation, Generator, StepTimings
from shard.engine.warmup import run_warmup
from shard.native import kernel_build, kernel_status
from shard.sampling.sampler import SamplingParams
from shard.tracing import TracingInterceptor

log = logging.getLogger(__name__)

DEFAULT_MAX_PREFILL_TOKENS = 4096


def rpc(method):
    """Runs the handler body on the model thread and maps exceptions to gRPC errors."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        start = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, method, self, request)
        except InvalidRequest as err:
            log.warning("%s rejected: %s", method.__name__, err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - one failed RPC must not stop the shard
            log.exception("%s failed", method.__name__)
            if self.config.world_size > 1 and isinstance(err, RuntimeError):
                self.fail(err)  # a collective broke: the ranks are out of step for good
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            log.debug("%s took %.1f ms", method.__name__, 1000 * (time.perf_counter() - start))

    return wrapper


def generation_to_pb(g: Generation) -> pb.Generation:
    out = pb.Generation(
        request_id=g.request_id, tokens=pb.Tokens(ids=[g.token_id], logprobs=[g.logprob])
    )
    if g.prefill_ids is not None:
        out.prefill_tokens.CopyFrom(pb.Tokens(ids=g.prefill_ids, logprobs=g.prefill_logprobs))
    if g.top_ids:
        out.top_tokens.append(pb.Tokens(ids=g.top_ids, logprobs=g.top_logprobs))
    if g.finish_reason is not None:
        out.generated_text.CopyFrom(
            pb.GeneratedText(
                generated_tokens=g.generated_tokens,
                finish_reason=g.finish_reason,
                seed=g.seed,
            )
        )
    return out


def cached_batch_to_pb(batch: Batch | None) -> pb.CachedBatch | None:
    if batch is None or not len(batch) or batch.all_stopped:
        return None
    return pb.CachedBatch(
        id=batch.id,
        request_ids=batch.request_ids,
        size=len(batch),
        max_tokens=batch.max_tokens,
        current_tokens=batch.current_tokens,
    )


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        config: ShardConfig,
        generator: Generator,
        attention_impl: str,
        executor: ThreadPoolExecutor,
    ):
        self.config = config
        self.generator = generator
        self.runner = generator.runner
        self.attention_impl = attention_impl
        self.cache = BatchCache()
        self.executor = executor  # the model thread: every torch call of the shard runs on it
        self.fatal: BaseException | None = None
        self.stop: asyncio.Event | None = None  # set by serve(); fail() sets it

    def fail(self, err: BaseException) -> None:
        """A rank whose collectives failed (a peer died, or hung past the collective timeout)
        exits, so the launcher stops the whole server instead of serving out-of-step ranks."""
        log.critical("collective failure, shard exits: %s", err)
        self.fatal = err
        if self.stop is not None:
            self.stop.set()

    async def Info(self, request, context):
        return pb.InfoResponse(
            requires_padding=False,
            dtype=self.config.dtype,
            device_type=self.runner.device.type,
            speculate=0,
            support_chunking=True,
            use_prefix_caching=self.config.use_prefix_caching,
            attention_impl=self.attention_impl,
            block_size=self.runner.block_size,
            vocab_size=self.runner.config.vocab_size,
            world_size=self.config.world_size,
            quantize=self.runner.quantize,
            batch_invariant=bool(self.config.batch_invariant),
            kernel_build=kernel_build(self.runner.device),
            model_implementation=self.runner.model.implementation,
            window_size=self.runner.window_size,
            kernels=kernel_status() if self.runner.device.type == "cpu" else "",
        )

    async def Health(self, request, context):
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        urls = [self.config.socket_url(rank) for rank in range(self.config.world_size)]
        return pb.ServiceDiscoveryResponse(urls=urls)

    @rpc
    def ClearCache(self, request):
        if request.HasField("id"):
            self.cache.delete(request.id)
        else:
            self.cache.clear()
        return pb.ClearCacheResponse()

    @rpc
    def FilterBatch(self, request):
        batch = self.cache.pop(request.batch_id).filter(list(request.request_ids))
        self.cache.put(batch)
        return pb.FilterBatchResponse(batch=cached_batch_to_pb(batch))

    @rpc
    def Warmup(self, request):
        self.cache.clear()
        self.generator.max_prefill_tokens = request.max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
        reqs = list(request.batch.requests)
        lens = [len(r.input_ids) or r.truncate or 1 for r in reqs] or [
            self.generator.max_prefill_tokens
        ]
        params = [SamplingParams.from_proto(r.parameters) for r in reqs] or [SamplingParams()]
        result = run_warmup(
            self.generator,
            lens,
            params,
            self.config.kv_cache_memory,
            request.max_input_tokens if request.HasField("max_input_tokens") else None,
            request.max_total_tokens if request.HasField("max_total_tokens") else None,
            self.config.cuda_memory_fraction,
            self.config.cuda_graphs,
            request.max_batch_total_tokens if request.HasField("max_batch_total_tokens") else None,
        )
        return pb.WarmupResponse(
            max_supported_total_tokens=result.max_supported_total_tokens,
            max_input_tokens=result.max_input_tokens,
            max_total_tokens=result.max_total_tokens,
        )

    def _new_batch(self, batch_pb) -> Batch:
        c = self.runner.config
        requests = [
            request_from_pb(
                r,
                self.runner.block_size,
                self.runner.num_blocks,
                c.vocab_size,
                self.generator.grammars,
            )  # fmt: skip
            for r in batch_pb.requests
        ]
        return Batch(batch_pb.id, requests, self.runner.block_size)

    @rpc
    def Prefill(self, request):
        start = time.perf_counter_ns()
        batch = self._new_batch(request.batch)
        concat_ns = None
        if request.HasField("cached_batch"):
            concat_start = time.perf_counter_ns()
            batch = Batch.concatenate([self.cache.pop(request.cached_batch.id), batch])
            concat_ns = time.perf_counter_ns() - concat_start
        generations, timings = self.generator.step(batch, _budget(request))
        return pb.PrefillResponse(
            **self._step_response(batch, generations, timings, start), concat_ns=concat_ns
        )

    @rpc
    def Decode(self, request):
        start = time.perf_counter_ns()
        if not request.batches:
            raise InvalidRequest("Decode needs at least one batch")
        batches = [self.cache.pop(b.id) for b in request.batches]
        concat_ns = None
        if len(batches) > 1:
            concat_start = time.perf_counter_ns()
            batches = [Batch.concatenate(batches)]
            concat_ns = time.perf_counter_ns() - concat_start
        generations, timings = self.generator.step(batches[0], _budget(request))
        return pb.DecodeResponse(
            **self._step_response(batches[0], generations, timings, start), concat_ns=concat_ns
        )

    def _step_response(
        self, batch: Batch, generations: list[Generation], timings: StepTimings, start_ns: int
    ) -> dict:
        self.cache.put(batch)
        return dict(
            generations=[generation_to_pb(g) for g in generations],
            batch=cached_batch_to_pb(batch),
            forward_ns=timings.forward_ns,
            decode_ns=timings.decode_ns,
            total_ns=time.perf_counter_ns() - start_ns,
            prefill_tokens=timings.prefill_tokens,
            decode_tokens=timings.decode_tokens,
        )


def _budget(request) -> int | None:
    """A Prefill/Decode request's prefill_budget, None when the router sent none; at least 1,
    so a batch of prompts always makes progress."""
    return max(request.prefill_budget, 1) if request.HasField("prefill_budget") else None


async def serve(
    config: ShardConfig,
    service: TextGenerationService,
    stop: asyncio.Event,
    traced: bool = False,
) -> None:
    """Serves on the rank's unix socket (mode 0600) until `stop` is set; `traced`: one span
    per call (shard/tracing.py)."""
    service.stop = stop
    server = grpc.aio.server(
        interceptors=[TracingInterceptor()] if traced else [],
        options=[
            ("grpc.max_receive_message_length", 256 * 2**20),
            ("grpc.max_send_message_length", 256 * 2**20),
        ],
    )
    pb_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    path = config.socket_path
    if os.path.exists(path):
        os.unlink(path)
    old_umask = os.umask(0o177)  # the socket is created 0600: only this user may connect
    try:
        server.add_insecure_port(f"unix://{path}")
        await server.start()
    finally:
        os.umask(old_umask)
    log.info("shard %d/%d serving on unix://%s", config.rank, config.world_size, path)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2)
        service.executor.shutdown(wait=True, cancel_futures=True)
        if os.path.exists(path):
            os.unlink(path)
        log.info("shard %d stopped", config.rank)
