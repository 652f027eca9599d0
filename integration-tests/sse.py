"""A minimal SSE reader for the tests (the clients under test have their own)."""

from __future__ import annotations

import json

import requests


def stream(url: str, body: dict, timeout: float = 120.0):
    """Yields each `data:` event of a POST as parsed JSON."""
    with requests.post(url, json=body, stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                yield json.loads(line[len("data:") :])


def stream_tokens(url: str, prompt: str, max_new_tokens: int = 32) -> tuple[list[int], dict]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    events = list(stream(f"{url}/generate_stream", body))
    return [e["token"]["id"] for e in events], events[-1]
