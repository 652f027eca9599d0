"""The router's side of the shard gRPC API: one connection per rank, found through
ServiceDiscovery on the master socket. Every call goes to all ranks at once and their answers
are merged: generations are concatenated (each rank reports only the requests it owns, or rank
0 reports all), the next batch and the timings come from the slowest rank's answer."""

from __future__ import annotations

import asyncio
import logging

import grpc

from pb import generate_pb2 as pb
from pb import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 2**20


class ShardError(Exception):
    """A shard failed an RPC; the text is the shard's own message."""


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
        calls = [getattr(stub, method)(request, timeout=timeout) for stub in self.stubs]
        try:
            return await asyncio.gather(*calls)
        except grpc.aio.AioRpcError as err:
            raise ShardError(err.details() or str(err.code())) from err

    async def info(self) -> pb.InfoResponse:
        return (await self._all("Info", pb.InfoRequest()))[-1]

    async def health(self, timeout: float = 5.0) -> None:
        await self._all("Health", pb.HealthRequest(), timeout)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest(id=batch_id))

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        answers = await self._all(
            "FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        )
        return answers[-1].batch if answers[-1].HasField("batch") else None

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        """The most constrained answer over the ranks."""
        answers = await self._all("Warmup", request)
        return min(
            answers,
            key=lambda a: (a.max_supported_total_tokens, a.max_input_tokens, a.max_total_tokens),
        )

    async def prefill(self, batch: pb.Batch, cached: pb.CachedBatch | None):
        request = pb.PrefillRequest(batch=batch, cached_batch=cached)
        return merge_steps(await self._all("Prefill", request))

    async def decode(self, batches: list[pb.CachedBatch]):
        return merge_steps(await self._all("Decode", pb.DecodeRequest(batches=batches)))


def merge_steps(answers: list):
    """Generations of every rank, without duplicates (rank order); the rest from the slowest."""
    if len(answers) == 1:
        return answers[0]
    slowest = max(answers, key=lambda a: a.total_ns)
    seen: set[int] = set()
    generations = []
    for answer in answers:
        for g in answer.generations:
            if g.request_id not in seen:
                seen.add(g.request_id)
                generations.append(g)
    merged = type(slowest)()
    merged.CopyFrom(slowest)
    del merged.generations[:]
    merged.generations.extend(generations)
    return merged
