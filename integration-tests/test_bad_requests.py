"""Requests whose parameters cannot be computed, sent into a running batch of the real model:
the ordinary requests beside them finish with their full greedy text, the odd ones get tokens
or a 422, and no response holds NaN or Infinity."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import PROMPTS

TINY = 1.2e-38  # a normal f32 just above the smallest: accepted, and 20 / TINY overflows f32


def strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def post_stream(url: str, body: dict) -> tuple[int, list]:
    """Status and every `data:` event, parsed strictly."""
    with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=300) as r:
        lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
        return r.status_code, [strict_json(line[5:]) for line in lines]


def post(url: str, body: dict) -> tuple[int, dict]:
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    return response.status_code, strict_json(response.text)


def test_odd_sampling_parameters_never_hurt_the_batch(launcher, expected_greedy):
    ordinary = [
        {"inputs": p, "parameters": {"max_new_tokens": 32, "details": True}} for p in PROMPTS[:4]
    ]
    odd = [
        {"temperature": TINY, "do_sample": True, "details": True},
        {"repetition_penalty": TINY},
        {"repetition_penalty": TINY, "do_sample": True, "top_n_tokens": 5, "details": True},
        {"temperature": TINY, "top_k": 3, "top_p": 0.5, "details": True, "top_n_tokens": 5},
        {"temperature": 1e-40, "do_sample": True},  # cannot be computed: 422
        {"repetition_penalty": 1e-40},
    ]
    odd_bodies = [
        {"inputs": PROMPTS[4 + i % 4], "parameters": {"max_new_tokens": 24, **p}}
        for i, p in enumerate(odd)
    ]
    with ThreadPoolExecutor(len(ordinary) + len(odd_bodies)) as pool:
        streams = [pool.submit(post_stream, launcher.url, b) for b in ordinary]
        answers = [pool.submit(post, launcher.url, b) for b in odd_bodies]
        streamed = [f.result() for f in streams]
        answered = [f.result() for f in answers]
    for body, (status, events) in zip(ordinary, streamed):
        assert status == 200
        assert "error" not in events[-1], events[-1]
        assert [e["token"]["id"] for e in events] == expected_greedy[body["inputs"]]
        assert events[-1]["generated_text"] is not None
    statuses = [status for status, _ in answered]
    assert statuses == [200, 200, 200, 200, 422, 422], answered
    assert all(out["generated_text"] for _, out in answered[:4])
    # temperature -> 0 is the argmax: the tiny temperature answers greedily
    tokens = [t["id"] for t in answered[0][1]["details"]["tokens"]]
    assert tokens == expected_greedy[odd_bodies[0]["inputs"]][: len(tokens)]
