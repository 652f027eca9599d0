"""`POST /invocations`, SageMaker's one route (TGI's `sagemaker_compatibility`): the body is
TGI's untagged union, tried in TGI's order: a body with `inputs` goes to `/`, one with
`messages` to the chat route, one with `prompt` to the completions route."""

from __future__ import annotations

from aiohttp import web

from router.errors import BodyError
from router.http.jsonio import read_json
from router.http.native import compat_generate
from router.http.openai_chat import chat
from router.http.openai_completions import complete

ROUTES = (("inputs", compat_generate), ("messages", chat), ("prompt", complete))


async def invocations(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if isinstance(body, dict):
        for key, route in ROUTES:
            if key in body:
                return await route(request, body)
    raise BodyError.json_data("data did not match any variant of untagged enum SagemakerRequest")
