"""Greedy answers with details for a fixed set of requests, compared with stored JSON."""

from __future__ import annotations

import pytest
import requests
from snapshot import assert_snapshot
from sse import stream

CHAT_HAIKU = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
CASES = {
    "generate_details": {
        "inputs": "What is the capital of France?",
        "parameters": {"max_new_tokens": 10, "details": True},
    },
    "generate_decoder_input_details": {
        "inputs": "def fibonacci(n):",
        "parameters": {
            "max_new_tokens": 6,
            "details": True,
            "decoder_input_details": True,
            "top_n_tokens": 3,
        },
    },
    "generate_stop_sequence": {
        "inputs": "List three prime numbers greater than 100.",
        "parameters": {"max_new_tokens": 30, "details": True, "stop": ["1"]},
    },
    "generate_truncate_full_text": {
        "inputs": "Once upon a time, in a small village,",
        "parameters": {
            "max_new_tokens": 8,
            "truncate": 5,
            "return_full_text": True,
            "details": True,
        },
    },
    "generate_seeded_sample": {
        "inputs": CHAT_HAIKU,
        "parameters": {
            "max_new_tokens": 12,
            "do_sample": True,
            "seed": 42,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.9,
            "details": True,
        },
    },
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_snapshot(launcher, name):
    response = requests.post(f"{launcher.url}/generate", json=CASES[name], timeout=120)
    assert response.status_code == 200, response.text
    assert_snapshot(name, response.json())


def test_stream_snapshot(launcher):
    body = {
        "inputs": "Give me a short recipe for pancakes.",
        "parameters": {"max_new_tokens": 8, "details": True, "top_n_tokens": 2},
    }
    assert_snapshot("generate_stream", list(stream(f"{launcher.url}/generate_stream", body)))
