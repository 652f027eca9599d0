"""A whole router app (real validation, tokenizer, queue, batcher, HTTP routes) in front of
the fake shard, for HTTP-level tests without a model:

    async with RouterApp(tokenizer) as app:
        response = await app.client.post("/generate", json={...})
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp.test_utils import TestClient, TestServer

from router.batching.batcher import Batcher
from router.batching.block_allocator import BlockAllocator
from router.batching.health import Health
from router.batching.infer import Infer
from router.batching.queue import Queue
from router.config import RouterConfig
from router.http.app import make_app
from router.http.state import AppState
from router.metrics import Metrics
from router.text.workers import start_workers
from router.validation.validator import Validation
from tests.router.fake_shard import FakeShardClient

BLOCK_SIZE = 4


class RouterApp:
    def __init__(
        self,
        tokenizer,
        num_blocks: int = 512,
        vocab: list[int] | None = None,
        worker_processes: bool = False,  # the router's validation worker processes
        **config_overrides,
    ):
        defaults = dict(
            max_input_tokens=200,
            max_total_tokens=400,
            max_batch_total_tokens=num_blocks * BLOCK_SIZE,
            max_batch_prefill_tokens=256,
        )
        self.config = RouterConfig(**{**defaults, **config_overrides})
        vocab = vocab or tokenizer.encode(
            " the quick brown fox jumps over", add_special_tokens=False
        )
        self.shard = FakeShardClient(vocab, block_size=BLOCK_SIZE, num_blocks=num_blocks)
        self.allocator = BlockAllocator(num_blocks, BLOCK_SIZE)
        self.queue = Queue(self.allocator, support_chunking=True)
        self.batcher = Batcher(
            self.shard,
            self.queue,
            self.allocator,
            self.config.max_batch_prefill_tokens,
            self.config.max_batch_total_tokens,
            None,
            1.2,
            20,
        )
        executor = start_workers(2) if worker_processes else ThreadPoolExecutor(2)
        self.executor = executor
        self.metrics = Metrics()
        self.metrics.watch(self.allocator, self.queue, self.batcher)
        self.state = AppState(
            self.config,
            Validation(self.config, tokenizer, executor),
            Infer(
                self.queue,
                tokenizer,
                self.config.max_concurrent_requests,
                self.config.max_total_tokens,
            ),
            tokenizer,
            Health(self.shard, 0),
            self.metrics,
        )

    async def __aenter__(self) -> "RouterApp":
        self.task = asyncio.create_task(self.batcher.run())
        self.client = TestClient(TestServer(make_app(self.state)))
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        assert self.allocator.free_blocks == self.allocator.total_blocks, "blocks leaked"
