"""Server-sent events as TGI writes them: `data: {compact json}\n\n`, no event names, and a
`:\n\n` comment when nothing was sent for 15 seconds (keeps proxies from closing the stream)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import web

KEEP_ALIVE_SECONDS = 15.0
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "x-compute-type": "cpu",
}


def sse_data(payload) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def with_keep_alive(events: AsyncIterator, response: web.StreamResponse) -> AsyncIterator:
    """Yields from `events`, writing a keep-alive comment while waiting longer than 15 s."""
    iterator = events.__aiter__()
    while True:
        next_event = asyncio.ensure_future(iterator.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=KEEP_ALIVE_SECONDS)
                if done:
                    break
                await response.write(b":\n\n")
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
        finally:
            if not next_event.done():
                next_event.cancel()
        yield event
