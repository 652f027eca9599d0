"""`GET /health`: 200 only when the shards answer. After a generation error the check is a
real one-token Prefill on the reserved block 0 (TGI's liveness batch), until one succeeds."""

from __future__ import annotations

import asyncio
import logging

from pb import generate_pb2 as pb
from router.client import ShardClient, ShardError

log = logging.getLogger(__name__)
LIVENESS_BATCH_ID = 2**64 - 1
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
                await asyncio.wait_for(self._liveness_prefill(), TIMEOUT_SECONDS)
            self.ok = True
        except (TimeoutError, ShardError) as err:
            log.warning("health check failed: %s", err)
            self.ok = False
        return self.ok

    async def _liveness_prefill(self) -> None:
        request = pb.Request(
            id=LIVENESS_BATCH_ID,
            inputs="liveness",
            input_ids=[self.liveness_token_id],
            truncate=1,
            blocks=[0],
            slots=[0],
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
            ),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
        )
        batch = pb.Batch(
            id=LIVENESS_BATCH_ID, requests=[request], size=1, max_tokens=2, max_blocks=1
        )
        await self.client.prefill(batch, None)
