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
        ended_by_eos = ids[-1] == tokenizer.eos_token_id
        assert out["details"]["finish_reason"] == ("eos_token" if ended_by_eos else "length")
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
        from text_generation import Client
        from text_generation.errors import OverloadedError as TgiOverloadedError

        with pytest.raises(TgiOverloadedError):
            Client(launcher.url).generate("hi", max_new_tokens=2)
        import openai

        chat = openai.OpenAI(base_url=f"{launcher.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            chat.chat.completions.create(
                model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
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


def test_info_health_tokenize(launcher, tokenizer):
    assert requests.get(f"{launcher.url}/health", timeout=10).status_code == 200
    info = requests.get(f"{launcher.url}/info", timeout=10).json()
    assert info["max_concurrent_requests"] == 20
    assert info["max_input_tokens"] < info["max_total_tokens"]
    assert info["router"] == "text-generation-router"
    text = "Hello wörld 😀"
    pieces = requests.post(f"{launcher.url}/tokenize", json={"inputs": text}, timeout=10).json()
    assert [p["id"] for p in pieces] == tokenizer(text)["input_ids"]
    assert all(p["text"] == text[p["start"] : p["stop"]] for p in pieces)
    # The emoji is two byte-level tokens; both point at the whole character, as in TGI.
    assert [p["text"] for p in pieces][-2:] == [" 😀", "😀"]


def test_bodies_that_are_not_json(launcher):
    url = f"{launcher.url}/generate"
    response = requests.post(url, data="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.text.startswith("Failed to parse the request body as JSON")
    response = requests.post(url, data='{"inputs": "hi"}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    response = requests.post(url, json={"inputs": 5})
    assert response.status_code == 422
    assert response.text.startswith("Failed to deserialize the JSON body into the target type")
    response = requests.post(url, json={"inputs": "x" * 2_100_000})
    assert response.status_code == 413
    assert requests.get(f"{launcher.url}/health", timeout=10).status_code == 200


def test_long_prompt_is_prefilled_in_chunks(launcher, smollm2_dir, tokenizer):
    """The prompt exceeds --max-batch-prefill-tokens (512): the router sends a chunk, the
    shard computes the rest in later steps, and the answer is still transformers' one."""
    import torch
    import transformers

    prompt = " ".join(PROMPTS) * 12
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert 512 < ids.shape[1] < 1500
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[
            0, ids.shape[1] :
        ].tolist()
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    out = requests.post(f"{launcher.url}/generate", json=body, timeout=300).json()
    assert [t["id"] for t in out["details"]["tokens"]] == expected


def test_watermark_is_detectable(launcher, tokenizer):
    from shard.sampling.watermark import Watermark

    prompt = (
        "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
    )
    last_prompt_token = tokenizer(prompt)["input_ids"][-1]
    scores = {}
    for watermark in (False, True):
        params = {"max_new_tokens": 64, "details": True, "watermark": watermark}
        body = {"inputs": prompt, "parameters": params}
        out = requests.post(f"{launcher.url}/generate", json=body, timeout=120).json()
        ids = [last_prompt_token] + [t["id"] for t in out["details"]["tokens"]]
        scores[watermark] = Watermark().detect(ids, 49152)
    assert scores[True] > 3 > 2 > scores[False], scores  # greedy: deterministic


def test_metrics_and_docs(launcher):
    requests.post(
        f"{launcher.url}/generate",
        json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
        timeout=60,
    )
    text = requests.get(f"{launcher.url}/metrics", timeout=10).text
    for line in (
        "# TYPE tgi_request_count counter",
        "# TYPE tgi_request_duration histogram",
        "# TYPE tgi_batch_current_size gauge",
        "# TYPE tgi_kv_cache_blocks_free gauge",
    ):
        assert line in text
    assert metric(launcher.url, "tgi_request_success") >= 1
    assert 'tgi_batch_inference_duration_count{method="prefill"}' in text
    spec = requests.get(f"{launcher.url}/api-doc/openapi.json", timeout=10).json()
    assert {"/generate", "/generate_stream", "/v1/chat/completions"} <= set(spec["paths"])
    assert requests.get(f"{launcher.url}/docs", timeout=10).status_code == 200
    response = requests.options(
        f"{launcher.url}/generate",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert response.headers["access-control-allow-origin"] == "*"


def test_a_shared_prefix_is_served_from_the_prefix_cache(launcher):
    """The second request's prompt starts with the first one's: its prefill skips the cached
    blocks, and its greedy tokens equal those computed without the cache (prompt logprobs
    bypass it)."""
    system = "You are a careful assistant. " * 40  # ~240 tokens, many full blocks
    first = {"inputs": system + "Name a colour.", "parameters": {"max_new_tokens": 4}}
    assert requests.post(f"{launcher.url}/generate", json=first, timeout=120).ok
    hits = metric(launcher.url, "tgi_prefix_cache_hit_tokens")

    def greedy(bypass: bool) -> list[int]:
        parameters = {"max_new_tokens": 16, "details": True, "decoder_input_details": bypass}
        body = {"inputs": system + "Name a fruit.", "parameters": parameters}
        response = requests.post(f"{launcher.url}/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    cached = greedy(bypass=False)
    assert metric(launcher.url, "tgi_prefix_cache_hit_tokens") - hits >= 200
    assert cached == greedy(bypass=True)
    assert metric(launcher.url, "tgi_kv_cache_blocks_free") == metric(
        launcher.url, "tgi_kv_cache_blocks_total"
    )
