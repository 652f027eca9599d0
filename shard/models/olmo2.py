"""OLMo 2 (AI2, 2024): Llama's decoder with its norms moved after each block ("post" layout:
x + norm(attn(x)), x + norm(mlp(x))) and an RMSNorm over the whole query and key projections
before rotary. That norm spans every head, so a rank holding some heads cannot compute it:
OLMo 2 runs on one rank."""

from __future__ import annotations

from dataclasses import replace

from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("Olmo2ForCausalLM",)


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    spec = standard_spec(config, norm_layout="post")
    return replace(
        spec,
        attention=replace(spec.attention, qk_norm="full"),
        no_tensor_parallel="its q/k norms span every head",
    )
