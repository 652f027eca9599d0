"""The HTTP server's life: listen, then drain on shutdown the way hyper's graceful shutdown
does in TGI: stop listening, close idle keep-alive connections, let every request in flight
finish (one still uploading its body included) and close its connection after the response,
answer 503 to a request that still arrives on an open connection, and wait for the last
handler, up to a deadline, while the batching loop still runs.

aiohttp's own `pre_shutdown` is not used for this: once it closes a connection, the server
ignores the rest of a request body still on its way, so that request could never finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from aiohttp import web

from router.http.app import make_app
from router.http.middleware import Handler
from router.http.prometheus_port import start_metrics_port
from router.http.state import AppState

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, state: AppState):
        self.state = state
        app = make_app(state)
        app.middlewares.insert(0, self._track)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.site: web.TCPSite | None = None
        self.metrics_runner: web.AppRunner | None = None  # --prometheus-port
        self.draining = False
        self.busy: Counter = Counter()  # connection (aiohttp's protocol) -> requests in flight
        self.idle = asyncio.Event()  # set when no request is in flight
        self.idle.set()

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            response = web.json_response(
                {"error": "the server is shutting down", "error_type": "unavailable"}, status=503
            )
            response.force_close()
            return response
        connection = request.protocol
        self.busy[connection] += 1
        self.idle.clear()
        try:
            response = await handler(request)
            if self.draining and not response.prepared:
                response.force_close()  # no next request on this connection
            return response
        finally:
            self.busy[connection] -= 1
            if not self.busy[connection]:
                del self.busy[connection]
            if not self.busy:
                self.idle.set()

    async def start(self) -> None:
        config = self.state.config
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, config.hostname, config.port)
        await self.site.start()
        if config.prometheus_port is not None:
            self.metrics_runner = await start_metrics_port(
                self.state.metrics, config.hostname, config.prometheus_port
            )
        log.info("Connected; listening on http://%s:%d", config.hostname, config.port)

    async def drain(self, timeout: float) -> None:
        """Serves no new request and waits (at most `timeout` s) for those in flight."""
        self.draining = True
        log.info("shutting down: %d requests in flight", sum(self.busy.values()))
        if self.site is not None:
            await self.site.stop()  # no new connection
        server = self.runner.server
        for connection in server.connections if server is not None else ():
            if connection not in self.busy:
                connection.force_close()  # idle keep-alive: closed now
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            log.warning("graceful timeout: %d requests still in flight", sum(self.busy.values()))

    async def close(self) -> None:
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        await self.runner.cleanup()
