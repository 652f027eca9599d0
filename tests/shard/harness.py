"""Runs a real shard gRPC server in a background thread and builds requests by hand, the way
the router will: token ids, blocks and slots from a simple block allocator."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from pb import generate_pb2 as pb
from pb import generate_pb2_grpc as pb_grpc
from shard.bootstrap import build_service
from shard.config import MemoryBudget, ShardConfig
from shard.server import serve


class ShardHarness:
    def __init__(
        self,
        model_dir: Path,
        socket_prefix: Path,
        dtype: str = "float32",
        block_size: int = 16,
        kv_bytes: int = 64 * 2**20,
        attention: str = "auto",
        quantize: str | None = "none",  # the oracle: dense weights, as transformers has them
    ):
        self.config = ShardConfig(
            model_dir=str(model_dir),
            model_id=str(model_dir),
            uds_path=str(socket_prefix),
            dtype=dtype,
            block_size=block_size,
            attention=attention,
            quantize=quantize,
            kv_cache_memory=MemoryBudget(bytes=kv_bytes),
        )
        self.service = build_service(self.config)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(30)
        self.channel = grpc.insecure_channel(f"unix://{self.config.socket_path}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = pb_grpc.TextGenerationServiceStub(self.channel)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            self._stop = asyncio.Event()
            self._loop.call_soon(self._started.set)
            await serve(self.config, self.service, self._stop)

        self._loop.run_until_complete(main())

    def close(self) -> None:
        self.channel.close()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


class BlockAllocator:
    """Hands out blocks 1..n-1 (block 0 is reserved), the router's job in production."""

    def __init__(self, num_blocks: int, block_size: int):
        self.free = list(range(num_blocks - 1, 0, -1))
        self.block_size = block_size

    def allocate(self, tokens: int) -> tuple[list[int], list[int]]:
        n = (tokens + self.block_size - 1) // self.block_size
        blocks = [self.free.pop() for _ in range(n)]
        slots = [b * self.block_size + k for b in blocks for k in range(self.block_size)][:tokens]
        return blocks, slots


@dataclass
class Params:
    max_new_tokens: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = True
    prefill_logprobs: bool = False
    top_n_tokens: int = 0


def make_request(
    request_id: int,
    input_ids: list[int],
    alloc: BlockAllocator,
    p: Params,
    cache_len: int = 0,
    chunk_len: int | None = None,
    blocks: list[int] | None = None,
) -> pb.Request:
    total = len(input_ids) + p.max_new_tokens
    if blocks is None:
        blocks, slots = alloc.allocate(total)
    else:
        slots = [b * alloc.block_size + k for b in blocks for k in range(alloc.block_size)][:total]
    return pb.Request(
        id=request_id,
        input_ids=input_ids,
        blocks=blocks,
        slots=slots,
        cache_len=cache_len,
        chunk_len=chunk_len,
        prefill_logprobs=p.prefill_logprobs,
        top_n_tokens=p.top_n_tokens,
        parameters=pb.NextTokenChooserParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=1.0,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=p.max_new_tokens, ignore_eos_token=p.ignore_eos
        ),
    )


def generate(stub, requests: list[pb.Request], batch_id: int = 0) -> dict[int, list[int]]:
    """Prefill then Decode until every request finished, filtering finished requests out
    after each step as the router does; returns the generated ids per request."""
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    batch = pb.Batch(id=batch_id, requests=requests, size=len(requests))
    cached = step(stub, stub.Prefill(pb.PrefillRequest(batch=batch)), out)
    while cached is not None:
        cached = step(stub, stub.Decode(pb.DecodeRequest(batches=[cached])), out)
    return out


def step(stub, response, out: dict[int, list[int]]):
    """Records the step's tokens; returns the batch to decode next (None when done)."""
    finished = set()
    for g in response.generations:
        out[g.request_id].extend(g.tokens.ids)
        if g.HasField("generated_text"):
            finished.add(g.request_id)
    if not response.HasField("batch"):
        return None
    batch = response.batch
    if finished:
        keep = [i for i in batch.request_ids if i not in finished]
        if not keep:
            stub.ClearCache(pb.ClearCacheRequest(id=batch.id))
            return None
        filtered = stub.FilterBatch(pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep))
        batch = filtered.batch
    return batch
