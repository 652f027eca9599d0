"""Server-sent events as TGI writes them: `data: {compact json}\n\n`, no event names, and a
`:\n\n` comment when nothing was sent for 15 seconds (keeps proxies from closing the stream).

A stream is opened before the request is admitted, so errors met after that point (overload,
validation, generation) travel in-band. Every write has a deadline: a client that stops
reading fills the socket buffers, and a write that cannot finish within `write_timeout` ends
the stream and drops the connection, so the request leaves the batch and its permit and KV
blocks are freed instead of being held forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any, TypeVar

from aiohttp import web

from router.http.jsonio import dumps

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 15.0
KEEP_ALIVE = b":\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

T = TypeVar("T")


def sse_data(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else dumps(payload, compact=True)
    return f"data: {text}\n\n".encode()


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class EventStream:
    """One SSE response."""

    def __init__(self, request: web.Request, write_timeout: float, compute_type: str):
        self.request = request
        self.write_timeout = write_timeout
        headers = {**SSE_HEADERS, "x-compute-type": compute_type}
        self.response = web.StreamResponse(status=200, headers=headers)

    @classmethod
    async def open(
        cls, request: web.Request, write_timeout: float, compute_type: str
    ) -> EventStream:
        stream = cls(request, write_timeout, compute_type)
        await stream.response.prepare(request)
        return stream

    async def write(self, data: bytes) -> None:
        """Writes `data`, or raises ClientGone (the connection is dropped on a stalled write)."""
        try:
            async with asyncio.timeout(self.write_timeout):
                await self.response.write(data)
        except TimeoutError:
            log.warning("client stopped reading for %.0f s: stream dropped", self.write_timeout)
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ClientGone() from None
        except ConnectionError as err:
            raise ClientGone() from err

    async def write_last(self, data: bytes) -> None:
        """Writes a closing message (`data: [DONE]`) unless the client is gone."""
        try:
            await self.write(data)
        except ClientGone:
            pass

    async def send(self, events: AsyncIterator[T], render: Callable[[T], Iterable[bytes]]) -> bool:
        """Writes the messages `render` makes of each event, with keep-alives while waiting.
        False when the client went away (the events are closed, so its request leaves the
        batch); True when the events ended."""
        try:
            async with aclosing(events):
                async for event in _with_keep_alive(events, self):
                    for data in render(event):
                        await self.write(data)
        except ClientGone:
            return False
        return True


async def _with_keep_alive(events: AsyncIterator[T], stream: EventStream) -> AsyncIterator[T]:
    """Yields from `events`, writing a keep-alive comment while waiting longer than 15 s."""
    iterator = events.__aiter__()
    while True:
        next_event = asyncio.ensure_future(iterator.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=KEEP_ALIVE_SECONDS)
                if done:
                    break
                await stream.write(KEEP_ALIVE)
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
        finally:
            if not next_event.done():  # we are cancelled: stop the generator's step first,
                next_event.cancel()  # so that closing the generator finds it idle
                await asyncio.wait({next_event})
        yield event
