"""How an RPC's exception is handled: one rank keeps serving; with several ranks a failed
collective makes the shard exit so the launcher can stop the whole server."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from shard.server import TextGenerationService, rpc


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted


class Fake:
    fail = TextGenerationService.fail

    def __init__(self, world_size: int):
        self.config = SimpleNamespace(world_size=world_size)
        self.executor = ThreadPoolExecutor(1)
        self.fatal = None
        self.stop = asyncio.Event()

    @rpc
    def Decode(self, request):
        raise RuntimeError("gloo: connection closed by peer")


@pytest.mark.parametrize("world_size, exits", [(1, False), (3, True)])
def test_runtime_errors_exit_only_a_split_model(world_size, exits):
    async def main():
        service, context = Fake(world_size), Context()
        with pytest.raises(Aborted):
            await service.Decode(None, context)
        assert context.code == grpc.StatusCode.INTERNAL and "gloo" in context.details
        assert service.stop.is_set() is exits
        assert (service.fatal is not None) is exits

    asyncio.run(main())
