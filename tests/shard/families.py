"""Tiny random-weight checkpoints of every family served natively, built by transformers from
a config (offline): the oracle the family tests and the launcher tests compare with. Every
norm and bias is randomized (transformers initializes them to constants), windows are shorter
than the test sequences and soft-caps small enough to bite."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)

# name -> (transformers config class, overrides)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(
        mlp_bias=True, attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    )),
    "llama-gelu": ("LlamaConfig", dict(hidden_act="gelu_pytorch_tanh")),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2-yarn": ("Qwen2Config", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
    })),
    "qwen3": ("Qwen3Config", dict()),
    "qwen3-moe": ("Qwen3MoeConfig", dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[1],
    )),
    "mixtral": ("MixtralConfig", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
    )),
    "gemma": ("GemmaConfig", dict()),
    "gemma2": ("Gemma2Config", dict(
        sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    )),
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )),
    "phi3-longrope": ("Phi3Config", dict(
        head_dim=None, partial_rotary_factor=0.5, original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                      "long_factor": [2.0, 3.0, 4.0, 6.0]},
    )),
    "olmo2": ("Olmo2Config", dict()),
    "granite": ("GraniteConfig", dict(
        embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
        logits_scaling=4.0,
    )),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2)),
}  # fmt: skip

# Families whose heads split in 2 (every one here); OLMo 2's q/k norms refuse it.
TENSOR_PARALLEL = [name for name in FAMILIES if name != "olmo2"]


def save_family(name: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Saves family `name`'s tiny model (safetensors) to `path`; returns path."""
    import transformers

    class_name, family = FAMILIES[name]
    torch.manual_seed(seed)
    fields = {k: v for k, v in {**BASE, **family, **overrides}.items() if v is not None}
    config = getattr(transformers, class_name)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                offset = 0.0 if name.startswith("gemma") else 1.0  # Gemma's scale by 1 + w
                param.copy_(offset + 0.3 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_reference(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
