"""JSON in and out of the HTTP layer.

In: the body must be `application/json` (else 415) and parse as serde_json would (else 400,
`router/validation/json_body.py`). Out: always valid JSON. Python's `json` writes NaN and
infinities as `NaN`/`-Infinity`, which no JSON parser accepts; serde writes them as `null`, and
so do we (logprobs are already None when not finite; this is the guard for anything else).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

from router.errors import BodyError
from router.validation.json_body import loads_strict

log = logging.getLogger(__name__)


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise BodyError.missing_json_content_type()
    return loads_strict(await request.read())


def dumps(value: Any, compact: bool = False) -> str:
    separators = (",", ":") if compact else None
    try:
        return json.dumps(value, separators=separators, allow_nan=False)
    except ValueError:
        log.warning("a response held a non-finite number; written as null")
        return json.dumps(_finite(value), separators=separators, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(value, status=status, headers=headers, dumps=dumps)
