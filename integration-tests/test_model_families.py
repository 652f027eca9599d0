"""The families through the real launcher, as a user brings them: a tiny random checkpoint of
each (transformers builds it offline, with SmolLM2's tokenizer), served in float32. Greedy
tokens equal transformers', each token's logprob within 1e-4 of transformers' log-softmax, the
same again when the prompt comes from the prefix cache; /info names the implementation. A
checkpoint nothing serves is refused in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import requests
import torch
from conftest import ROOT, Launcher

from tests.shard.families import load_reference, save_family

PROMPTS = [
    "The river ran past the old mill",
    "Seven quiet engines",
    "A lantern, a ladder and a copper window in the garden at night",
    "Thunder",
]
CASES = {  # name -> (how to build it, launcher flags, expected implementation)
    "gemma2": ("gemma2", (), "native"),
    "qwen3-moe": ("qwen3-moe", (), "native"),
    "phi3-longrope": ("phi3-longrope", (), "native"),
    "mistral-tp2": ("mistral", ("--num-shard", "2"), "native"),
    "gpt-neox": ("GPTNeoXConfig", (), "transformers"),
}


def save_checkpoint(kind: str, path, smollm2_dir):
    if kind.endswith("Config"):
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, kind)(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=49152, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    else:
        save_family(kind, path, vocab_size=49152, max_position_embeddings=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, tmp_path_factory, smollm2_dir):
    kind, flags, implementation = CASES[request.param]
    path = save_checkpoint(kind, tmp_path_factory.mktemp(request.param), smollm2_dir)
    handle = Launcher(f"family-{request.param}", "--model-id", str(path), *flags)
    yield handle, load_reference(path), implementation
    handle.stop()


def generate(url: str, prompt: str) -> list[tuple[int, float]]:
    tokens = requests.post(f"{url}/tokenize", json={"inputs": prompt}, timeout=60).json()
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "details": True}}
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    return [t["id"] for t in tokens], [(t["id"], t["logprob"]) for t in details["tokens"]]


def test_greedy_tokens_and_logprobs_equal_transformers(served):
    handle, hf, implementation = served
    assert requests.get(f"{handle.url}/info", timeout=10).json()["model_implementation"] == (
        implementation
    )
    for prompt in PROMPTS:
        prompt_ids, generated = generate(handle.url, prompt)
        ids = prompt_ids + [i for i, _ in generated]
        with torch.inference_mode():
            logprobs = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        n = len(prompt_ids)
        expected = logprobs[n - 1 : -1].argmax(-1).tolist()
        assert [i for i, _ in generated] == expected, prompt
        chosen = logprobs[torch.arange(n - 1, len(ids) - 1), torch.tensor(ids[n:])]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in generated]), chosen, atol=1e-4, rtol=0
        )
        assert generate(handle.url, prompt) == (prompt_ids, generated)  # from the prefix cache


def test_a_checkpoint_nothing_serves_is_refused_in_one_line(tmp_path):
    import transformers

    config = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    command = [sys.executable, "-m", "launcher", "--model-id", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    refusals = [line for line in done.stderr.splitlines() if "cannot serve" in line]
    assert len(refusals) == 1 and "BloomForCausalLM" in refusals[0], done.stderr
