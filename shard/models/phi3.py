"""Phi-3, Phi-3.5 and Phi-4 (Microsoft, 2024): Llama's decoder whose checkpoints fuse q, k and v
into one qkv_proj and gate and up into one gate_up_proj; long-context variants use longrope
(per-dimension rescaled frequencies and an attention factor), Phi-4-mini a partial rotary
dimension, and config.json's sliding_window applies to every layer."""

from __future__ import annotations

from dataclasses import replace

from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("Phi3ForCausalLM",)


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    spec = standard_spec(config)
    return replace(
        spec,
        attention=replace(spec.attention, fused_qkv=True, qkv_bias=False, o_bias=False),
        mlp=replace(spec.mlp, fused_gate_up=True),
    )
