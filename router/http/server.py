"""The HTTP server's life: listen, then drain on shutdown the way hyper's graceful shutdown
does in TGI. Draining stops listening, closes idle keep-alive connections at once and every
other connection after its current response (no new request is served), and waits for the
requests in flight to end, up to a deadline, while the batching loop still runs."""

from __future__ import annotations

import logging

from aiohttp import web

from router.http.app import make_app
from router.http.state import AppState

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, state: AppState):
        self.state = state
        self.runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None)
        self.site: web.TCPSite | None = None

    async def start(self) -> None:
        config = self.state.config
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, config.hostname, config.port)
        await self.site.start()
        log.info("Connected; listening on http://%s:%d", config.hostname, config.port)

    async def drain(self, timeout: float) -> None:
        """Serves no new request and waits (at most `timeout` s) for those in flight."""
        server = self.runner.server
        if server is None:
            return
        log.info("shutting down: %d connections open", len(server.connections))
        if self.site is not None:
            await self.site.stop()  # no new connection
        server.pre_shutdown()  # idle keep-alive connections close; busy ones after this response
        await server.shutdown(timeout)  # waits for the handlers; cancels them past the deadline

    async def close(self) -> None:
        await self.runner.cleanup()
