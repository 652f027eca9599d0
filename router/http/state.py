"""What every handler reaches through the app: the config and the engine's parts."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from router.batching.health import Health
from router.batching.infer import Infer
from router.config import RouterConfig
from router.metrics import Metrics
from router.text.tokenizer import Tokenizer
from router.validation.validator import Validation


@dataclass
class AppState:
    config: RouterConfig
    validation: Validation
    infer: Infer
    tokenizer: Tokenizer
    health: Health
    metrics: Metrics


STATE = web.AppKey("state", AppState)


def app_state(request: web.Request) -> AppState:
    return request.app[STATE]
