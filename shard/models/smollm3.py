"""SmolLM3 (Hugging Face, 2025): Llama's decoder in which every fourth layer (no_rope_layers[i]
== 0) has no rotary positions at all (NoPE)."""

from __future__ import annotations

from dataclasses import replace

from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("SmolLM3ForCausalLM",)


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    spec = standard_spec(config)
    uses_rope = config.raw.get("no_rope_layers") or [1] * config.num_layers
    layers = tuple(
        layer if uses_rope[i] else replace(layer, attention=replace(layer.attention, rope=None))
        for i, layer in enumerate(spec.layers)
    )
    return replace(spec, layers=layers)
