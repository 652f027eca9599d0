"""The launched server on the default model, through raw HTTP and huggingface_hub's
InferenceClient: greedy output equals transformers, streams and concurrency agree, and the
server keeps its promises under disconnects and overload."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import PROMPTS
from sse import stream, stream_tokens


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def test_generate_greedy_matches_transformers(launcher, expected_greedy, tokenizer):
    for prompt in PROMPTS:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "details": True}}
        response = requests.post(f"{launcher.url}/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        out = response.json()
        ids = [t["id"] for t in out["details"]["tokens"]]
        assert ids == expected_greedy[prompt], prompt
        assert out["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert out["details"]["finish_reason"] in ("length", "eos_token")
        assert out["details"]["generated_tokens"] == len(ids)
        assert out["details"]["seed"] is None and out["details"]["prefill"] == []
        assert int(response.headers["x-generated-tokens"]) == len(ids)


def test_stream_matches_generate(launcher, expected_greedy, tokenizer):
    prompt = PROMPTS[2]
    ids, last = stream_tokens(launcher.url, prompt)
    assert ids == expected_greedy[prompt]
    assert last["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert last["details"]["input_length"] == len(tokenizer(prompt)["input_ids"])
    assert last["details"]["generated_tokens"] == len(ids)


def test_inference_client_text_generation(launcher, expected_greedy, tokenizer, monkeypatch):
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(
        huggingface_hub.inference._common, "_UNSUPPORTED_TEXT_GENERATION_KWARGS", {}
    )
    client = InferenceClient(launcher.url)
    prompt = PROMPTS[0]
    expected_text = tokenizer.decode(expected_greedy[prompt], skip_special_tokens=True)
    out = client.text_generation(prompt, max_new_tokens=32, details=True)
    assert [t.id for t in out.details.tokens] == expected_greedy[prompt]
    assert out.generated_text == prompt + expected_text  # POST / returns the full text, as TGI
    assert (
        client.text_generation(prompt, max_new_tokens=32, return_full_text=False) == expected_text
    )
    chunks = list(
        client.text_generation(
            prompt, max_new_tokens=32, stream=True, details=True, return_full_text=False
        )
    )
    assert [c.token.id for c in chunks] == expected_greedy[prompt]
    assert "".join(c.token.text for c in chunks) == tokenizer.decode(expected_greedy[prompt])
    assert chunks[-1].generated_text == expected_text
    assert chunks[-1].details.generated_tokens == len(expected_greedy[prompt])


def test_sixteen_concurrent_streams_get_what_they_get_alone(launcher, expected_greedy):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: stream_tokens(launcher.url, p)[0], prompts))
    for prompt, ids in zip(prompts, results):
        assert ids == expected_greedy[prompt], prompt


def test_client_disconnect_frees_blocks(launcher):
    free_before = metric(launcher.url, "tgi_kv_cache_blocks_free")
    body = {"inputs": PROMPTS[6], "parameters": {"max_new_tokens": 400}}
    with requests.post(f"{launcher.url}/generate_stream", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
        assert metric(launcher.url, "tgi_kv_cache_blocks_free") < free_before
    # The connection is closed: the router must drop the request and free its blocks.
    deadline = time.time() + 15
    while (
        time.time() < deadline and metric(launcher.url, "tgi_kv_cache_blocks_free") != free_before
    ):
        time.sleep(0.2)
    assert metric(launcher.url, "tgi_kv_cache_blocks_free") == free_before
    assert metric(launcher.url, "tgi_batch_current_size") == 0


def test_overload_gives_429(launcher):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import OverloadedError

    stop = threading.Event()
    started = threading.Barrier(21)

    def long_stream():
        body = {"inputs": PROMPTS[3], "parameters": {"max_new_tokens": 300}}
        events = stream(f"{launcher.url}/generate_stream", body)
        next(events)
        started.wait(60)
        for _ in events:
            if stop.is_set():
                return

    threads = [threading.Thread(target=long_stream) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        started.wait(120)  # all 20 permits are taken
        response = requests.post(f"{launcher.url}/generate", json={"inputs": "hi"}, timeout=30)
        assert response.status_code == 429
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        overloaded = list(stream(f"{launcher.url}/generate_stream", {"inputs": "hi"}))
        assert overloaded == [{"error": "Model is overloaded", "error_type": "overloaded"}]
        with pytest.raises(OverloadedError):
            InferenceClient(launcher.url).text_generation("hi", max_new_tokens=2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    response = requests.post(
        f"{launcher.url}/generate",
        json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
        timeout=60,
    )
    assert response.status_code == 200  # permits came back


def test_validation_error_shape(launcher):
    body = {"inputs": "hi", "parameters": {"temperature": 0}}
    response = requests.post(f"{launcher.url}/generate", json=body, timeout=30)
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `temperature` must be strictly positive",
        "error_type": "validation",
    }
    events = list(stream(f"{launcher.url}/generate_stream", body))
    assert events == [response.json()]
