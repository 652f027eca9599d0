"""Llama 1-3.x (Touvron et al.; Meta's llama3 rope scaling), Mistral (a sliding window on every
layer) and Qwen2/2.5 (biases on q, k and v; yarn for long context): pre-norm decoder layers of
grouped-query attention and a gated MLP, RMSNorm, rotary positions, optionally a tied LM head.
The decoder itself is shard/models/decoder.py's; this file says how these configs read."""

from __future__ import annotations

from dataclasses import replace

from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    spec = standard_spec(config)
    if config.model_type == "qwen2":  # q, k and v carry biases, o_proj none
        return replace(spec, attention=replace(spec.attention, qkv_bias=True, o_bias=False))
    return spec
