"""`GET /health`: 200 only when the shards answer. After a generation error the check is a
real one-token Prefill on the reserved block 0 (TGI's liveness batch), until one succeeds."""

from __future__ import annotations

import asyncio
import logging

from router.batching.shard_client import ShardClient, ShardError

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 10.0


class Health:
    def __init__(self, client: ShardClient, liveness_token_id: int, world_size: int = 1):
        self.client = client
        self.liveness_token_id = liveness_token_id
        # With several ranks a Prefill runs collectives, and one sent beside the batcher's
        # steps could reach the ranks in different orders: only the Health RPC is used then.
        self.use_liveness_prefill = world_size == 1
        self.ok = True

    def request_failed(self) -> None:
        self.ok = False

    async def check(self) -> bool:
        try:
            if self.ok or not self.use_liveness_prefill:
                await self.client.health(timeout=TIMEOUT_SECONDS)
            else:
                await asyncio.wait_for(
                    self.client.liveness_prefill(self.liveness_token_id), TIMEOUT_SECONDS
                )
            self.ok = True
        except (TimeoutError, ShardError) as err:
            log.warning("health check failed: %s", err)
            self.ok = False
        return self.ok
