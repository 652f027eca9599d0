"""TGI's `--prometheus-port`: the metrics registry served alone on a second port, on any path,
beside `/metrics` on the main port. A port already taken is logged and skipped: the main port's
`/metrics` still works, and two servers on one machine must not fail over a metrics port."""

from __future__ import annotations

import logging

from aiohttp import web

from router.metrics import Metrics

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_app(metrics: Metrics) -> web.Application:
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/{path:.*}", render)
    return app


async def start_metrics_port(metrics: Metrics, host: str, port: int) -> web.AppRunner | None:
    """The running metrics server, or None where `port` cannot be bound."""
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        log.warning("metrics not served on port %d (%s); /metrics on the main port is", port, err)
        await runner.cleanup()
        return None
    log.info("serving metrics on http://%s:%d", host, port)
    return runner
