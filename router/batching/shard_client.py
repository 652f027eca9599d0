"""The router's side of the shard gRPC API, and the only module of the router that imports the
generated `pb` stubs: every answer is turned into the typed dataclasses below before it leaves.

There is one connection per rank, found through ServiceDiscovery on the master socket. Every
call goes to all ranks at once and their answers are merged: generations are concatenated
(each rank reports only the requests it owns, or rank 0 reports all), the next batch and the
timings come from the slowest rank's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from common.tracing import grpc_metadata
from pb import generate_pb2 as pb
from pb import generate_pb2_grpc as pb_grpc
from router.batching.block_allocator import Allocation
from router.request import ValidatedRequest

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 2**20
LIVENESS_ID = 2**64 - 1  # batch and request id of the health check's one-token prefill
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


class ShardError(Exception):
    """A shard failed an RPC; the text is the shard's own message."""


# ---- what the router sends -------------------------------------------------------------------


@dataclass(frozen=True)
class NewRequest:
    """A request joining a batch, its KV blocks allocated."""

    id: int
    request: ValidatedRequest
    allocation: Allocation
    chunk_len: int | None = None  # prompt tokens of its first prefill when the budget cut it


# ---- what the shards answer -----------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    block_size: int
    support_chunking: bool
    world_size: int  # ranks behind the master socket (0 from an older shard: read it as 1)
    dtype: str = ""
    device_type: str = ""
    quantize: str = ""  # the weight quantization served ("none" when dense)
    use_prefix_caching: bool = False
    batch_invariant: bool = False  # same bits whatever the batch, prefix cache and chunking
    kernel_build: str = ""  # what the numbers depend on besides the model (shard/native.py)
    model_implementation: str = ""  # "native" or "transformers" (shard/models/)
    kernels: str = ""  # how the CPU kernels were loaded (shard/native.py: kernel_status)


@dataclass(frozen=True)
class WarmupResult:
    max_supported_total_tokens: int  # KV positions in the cache, block 0 included
    max_input_tokens: int
    max_total_tokens: int


@dataclass(frozen=True)
class CachedBatch:
    """A batch the shards hold between steps."""

    id: int
    request_ids: tuple[int, ...]
    size: int
    max_tokens: int  # KV positions reserved by its requests
    current_tokens: int  # tokens its next step computes


@dataclass(frozen=True)
class Generation:
    """One request's result of one step."""

    request_id: int
    token_id: int
    logprob: float  # NaN when unknown
    top_tokens: tuple[tuple[int, float], ...] = ()  # (id, logprob), best first
    prefill: tuple[tuple[int, float], ...] = ()  # prompt (id, logprob) when asked; first NaN
    finish_reason: str | None = None  # "length" | "eos_token" when the shard stopped it


@dataclass(frozen=True)
class StepResult:
    """The answer to a Prefill or a Decode."""

    generations: tuple[Generation, ...]
    batch: CachedBatch | None  # None when every request of the batch finished
    forward_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0
    concat_ns: int | None = None
    prefill_tokens: int = 0  # prompt tokens the forward computed
    decode_tokens: int = 0  # requests it computed a generated token for


# ---- the client -----------------------------------------------------------------------------


def _channel(url: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        url,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


class ShardClient:
    def __init__(self, stubs: list[pb_grpc.TextGenerationServiceStub], channels: list):
        self.stubs = stubs
        self.channels = channels

    @classmethod
    async def connect(cls, master_uds_path: str, timeout: float = 60.0) -> ShardClient:
        master = _channel(f"unix://{master_uds_path}")
        try:
            stub = pb_grpc.TextGenerationServiceStub(master)
            response = await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise ShardError(f"Server does not support v3 interface: {err}") from err
        finally:
            await master.close()
        channels = [_channel(url) for url in response.urls]
        return cls([pb_grpc.TextGenerationServiceStub(c) for c in channels], channels)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def _all(self, method: str, request, timeout: float | None = None) -> list:
        metadata = grpc_metadata()  # the current span's traceparent: the shards' parent
        calls = [
            getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            for stub in self.stubs
        ]
        try:
            return await asyncio.gather(*calls)
        except grpc.aio.AioRpcError as err:
            raise ShardError(err.details() or str(err.code())) from err

    async def info(self) -> ShardInfo:
        answer = (await self._all("Info", pb.InfoRequest()))[-1]
        return ShardInfo(
            answer.block_size,
            answer.support_chunking,
            max(answer.world_size, 1),
            answer.dtype,
            answer.device_type,
            answer.quantize or "none",
            answer.use_prefix_caching,
            answer.batch_invariant,
            answer.kernel_build,
            answer.model_implementation,
            answer.kernels,
        )

    async def health(self, timeout: float = 5.0) -> None:
        await self._all("Health", pb.HealthRequest(), timeout)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest(id=batch_id))

    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatch | None:
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        answer = (await self._all("FilterBatch", request))[-1]
        return _cached_batch(answer.batch) if answer.HasField("batch") else None

    async def warmup(
        self,
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
        max_batch_size: int | None,
        max_batch_total_tokens: int | None = None,
    ) -> WarmupResult:
        """The most constrained answer over the ranks. Limits left None are the shards' to
        choose (from the model and the KV cache); `max_batch_total_tokens` sizes a CPU
        shard's KV cache."""
        longest = max_input_tokens or max_prefill_tokens
        request = pb.WarmupRequest(
            batch=_warmup_batch(longest, max_prefill_tokens, max_batch_size),
            max_input_tokens=max_input_tokens,
            max_prefill_tokens=max_prefill_tokens,
            max_total_tokens=max_total_tokens,
            max_batch_total_tokens=max_batch_total_tokens,
        )
        answers = await self._all("Warmup", request)
        worst = min(
            answers,
            key=lambda a: (a.max_supported_total_tokens, a.max_input_tokens, a.max_total_tokens),
        )
        return WarmupResult(
            worst.max_supported_total_tokens, worst.max_input_tokens, worst.max_total_tokens
        )

    async def prefill(
        self,
        batch_id: int,
        requests: Sequence[NewRequest],
        cached: CachedBatch | None,
        prefill_budget: int | None = None,
    ) -> StepResult:
        """Prefills `requests` as batch `batch_id`, merged into `cached` when given; the
        forward computes at most `prefill_budget` prompt tokens (None: the shards' default)."""
        request = pb.PrefillRequest(
            batch=_batch(batch_id, requests),
            cached_batch=None if cached is None else _cached_batch_pb(cached),
            prefill_budget=prefill_budget,
        )
        return _step_result(await self._all("Prefill", request))

    async def decode(
        self, batches: Sequence[CachedBatch], prefill_budget: int | None = None
    ) -> StepResult:
        request = pb.DecodeRequest(
            batches=[_cached_batch_pb(b) for b in batches], prefill_budget=prefill_budget
        )
        return _step_result(await self._all("Decode", request))

    async def liveness_prefill(self, token_id: int) -> None:
        """TGI's liveness check: a one-token prefill on the reserved block 0."""
        request = pb.Request(
            id=LIVENESS_ID,
            inputs="liveness",
            input_ids=[token_id],
            truncate=1,
            blocks=[0],
            slots=[0],
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
            ),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
        )
        batch = pb.Batch(id=LIVENESS_ID, requests=[request], size=1, max_tokens=2, max_blocks=1)
        await self._all("Prefill", pb.PrefillRequest(batch=batch))


# ---- typed <-> protobuf ---------------------------------------------------------------------


def request_to_pb(new: NewRequest) -> pb.Request:
    r = new.request
    s = r.sampling
    return pb.Request(
        id=new.id,
        inputs=r.inputs,
        input_ids=r.input_ids,
        truncate=r.truncate or r.input_length,
        parameters=pb.NextTokenChooserParameters(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            typical_p=s.typical_p,
            do_sample=s.do_sample,
            seed=s.seed,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            watermark=s.watermark,
            grammar=s.grammar,
            grammar_type=s.grammar_type,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=r.stopping.max_new_tokens,
            stop_sequences=r.stopping.stop_sequences,
            ignore_eos_token=r.stopping.ignore_eos_token,
        ),
        prefill_logprobs=r.prefill_logprobs,
        top_n_tokens=r.top_n_tokens,
        blocks=new.allocation.blocks,
        slots=new.allocation.slots,
        cache_len=new.allocation.cache_len,
        add_special_tokens=r.add_special_tokens,
        chunk_len=new.chunk_len,
    )


def _batch(batch_id: int, requests: Sequence[NewRequest]) -> pb.Batch:
    return pb.Batch(
        id=batch_id,
        requests=[request_to_pb(r) for r in requests],
        size=len(requests),
        max_tokens=sum(len(r.allocation.slots) for r in requests),
        max_blocks=max(len(r.allocation.blocks) for r in requests),
    )


def _warmup_batch(max_input: int, max_prefill: int, max_batch_size: int | None) -> pb.Batch:
    """Requests totalling max_prefill tokens, with every sampling option switched on so the
    shards' profile covers the costliest step (TGI's warmup batch)."""
    requests, left = [], max_prefill
    while left > 0 and (max_batch_size is None or len(requests) < max_batch_size):
        n = min(max_input, left)
        requests.append(
            pb.Request(
                id=len(requests),
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
    return pb.Batch(id=0, requests=requests, size=len(requests))


def _cached_batch(b: pb.CachedBatch) -> CachedBatch:
    return CachedBatch(b.id, tuple(b.request_ids), b.size, b.max_tokens, b.current_tokens)


def _cached_batch_pb(b: CachedBatch) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=b.id,
        request_ids=b.request_ids,
        size=b.size,
        max_tokens=b.max_tokens,
        current_tokens=b.current_tokens,
    )


def _pairs(tokens: pb.Tokens) -> tuple[tuple[int, float], ...]:
    return tuple(zip(tokens.ids, tokens.logprobs))


def _generation(g: pb.Generation) -> Generation:
    finish = None
    if g.HasField("generated_text"):
        finish = FINISH_REASONS.get(g.generated_text.finish_reason, "length")
    return Generation(
        request_id=g.request_id,
        token_id=g.tokens.ids[0],
        logprob=g.tokens.logprobs[0],
        top_tokens=_pairs(g.top_tokens[0]) if len(g.top_tokens) else (),
        prefill=_pairs(g.prefill_tokens),
        finish_reason=finish,
    )


def _step_result(answers: list) -> StepResult:
    """Generations of every rank, without duplicates (rank order); the rest from the slowest."""
    slowest = max(answers, key=lambda a: a.total_ns)
    seen: set[int] = set()
    generations = []
    for answer in answers:
        for g in answer.generations:
            if g.request_id not in seen:
                seen.add(g.request_id)
                generations.append(_generation(g))
    return StepResult(
        generations=tuple(generations),
        batch=_cached_batch(slowest.batch) if slowest.HasField("batch") else None,
        forward_ns=slowest.forward_ns,
        decode_ns=slowest.decode_ns,
        total_ns=slowest.total_ns,
        concat_ns=slowest.concat_ns if slowest.HasField("concat_ns") else None,
        prefill_tokens=slowest.prefill_tokens,
        decode_tokens=slowest.decode_tokens,
    )
