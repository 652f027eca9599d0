"""Same request, same answer, through the real launcher: a request's tokens and logprobs are
the same bits alone on an idle server, beside 0 to 64 other requests of random lengths, with
half its prompt in the prefix cache, and with a long prompt prefilled in chunks beside running
streams; a seeded chat request twice gives the same text. On the default model with the
default settings (its GGUF blocks, the compiled decoder), and on a tiny random model in float32
without quantization (the dense kernels)."""

from __future__ import annotations

import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import Launcher

from tests.conftest import save_tiny_model

WORDS = (
    "river mountain lantern quiet engine harvest copper violet window thunder garden pocket "
    "silver ladder orbit meadow candle whisper anchor puzzle forest marble"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module", params=["default model", "tiny float32"])
def server(request, tmp_path_factory, smollm2_dir):
    if request.param == "default model":
        handle = Launcher("invariant", "--max-concurrent-requests", "128", oracle=False)
    else:
        model_dir = tmp_path_factory.mktemp("tiny-float32")
        save_tiny_model(model_dir, vocab_size=49152, max_position_embeddings=4096)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smollm2_dir / name).exists():
                shutil.copy(smollm2_dir / name, model_dir / name)
        handle = Launcher(
            "invariant-tiny", "--model-id", str(model_dir), "--max-concurrent-requests", "128"
        )
    yield handle
    handle.stop()


def generate(url: str, inputs: str, **parameters) -> dict:
    body = {"inputs": inputs, "parameters": {"details": True, **parameters}}
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    out = response.json()
    return {
        "text": out["generated_text"],
        "tokens": [(t["id"], t["logprob"]) for t in out["details"]["tokens"]],
    }


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_info_states_the_guarantee(server):
    info = requests.get(f"{server.url}/info", timeout=10).json()
    assert info["batch_invariant"] is True
    assert re.fullmatch(r"fp_[0-9a-f]{10}", info["system_fingerprint"])


def test_a_seeded_chat_request_twice_gives_the_same_text(server):
    """The second request's prompt comes from the prefix cache (its full blocks)."""
    system = "You are a storyteller. " + words(random.Random(3), 60)
    body = {
        "model": "tgi",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Give a warning to a brave adventurer."},
        ],
        "seed": 11,
        "temperature": 0.9,
        "max_tokens": 30,
    }
    hits = metric(server.url, "tgi_prefix_cache_hit_tokens")
    answers = []
    for _ in range(2):
        response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert metric(server.url, "tgi_prefix_cache_hit_tokens") - hits >= 16
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1]
    assert answers[0]["system_fingerprint"] == answers[1]["system_fingerprint"]


TARGETS = [
    ("greedy", dict(max_new_tokens=24)),
    ("seeded", dict(max_new_tokens=24, do_sample=True, seed=5, temperature=0.8, top_p=0.9)),
]


def target_prompts() -> list[str]:
    rng = random.Random(11)
    return [
        "Write a short note about " + words(rng, 40),
        "Summarize this: " + words(rng, 1800),  # chunked by --max-batch-prefill-tokens 512
    ]


def test_a_request_gets_the_same_bits_in_any_batch(server):
    """Each target alone on the idle server first; then again and again among random other
    requests (some sharing the first half of its prompt, so that half comes from the prefix
    cache), sent while they run; every token id and logprob must be the same."""
    prompts = target_prompts()
    solo = {
        (p, name): generate(server.url, p, **params) for p in prompts for name, params in TARGETS
    }
    rng = random.Random(0)
    with ThreadPoolExecutor(max_workers=80) as pool:
        for others in (0, 4, 12, 30, 64):
            prompt = prompts[others % 2]
            name, params = TARGETS[rng.randrange(2)]
            half = prompt[: len(prompt) // 2]
            generate(server.url, half + words(rng, 7), max_new_tokens=2)  # caches the half
            crowd = [
                pool.submit(
                    generate, server.url, words(rng, rng.randint(3, 300)),
                    max_new_tokens=rng.randint(1, 40), do_sample=rng.random() < 0.5,
                )
                for _ in range(others)
            ]  # fmt: skip
            got = pool.submit(generate, server.url, prompt, **params).result()
            for future in crowd:
                future.result()
            assert got == solo[(prompt, name)], f"{name} among {others} others"
