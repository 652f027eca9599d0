"""Granite 3.x (IBM, 2024): Llama's decoder with four scalars of its own: the embeddings times
embedding_multiplier, scores scaled by attention_multiplier, each block's output times
residual_multiplier before it joins the residual stream, and the logits divided by
logits_scaling."""

from __future__ import annotations

from dataclasses import replace

from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("GraniteForCausalLM",)


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    raw = config.raw
    spec = standard_spec(config)
    return replace(
        spec,
        attention=replace(spec.attention, scale=raw.get("attention_multiplier", 1.0)),
        embedding_scale=raw.get("embedding_multiplier", 1.0),
        residual_scale=raw.get("residual_multiplier", 1.0),
        logit_divisor=raw.get("logits_scaling", 1.0),
    )
