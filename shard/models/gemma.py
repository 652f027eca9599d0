"""Gemma 1, 2 and 3 (Gemma team, Google DeepMind, 2024-2025).

Gemma: Llama's decoder with norms that scale by (1 + weight), token embeddings scaled by
sqrt(hidden_size) (rounded to the activations' dtype), a GELU-gated MLP (tanh approximation)
and a tied LM head.
Gemma 2 adds: norms after attention and after the MLP as well as before (a "sandwich"), scores
scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5, attention scores and final
logits soft-capped (cap * tanh(x / cap)), and sliding-window layers alternating with global ones.
Gemma 3 drops the soft-capping for an RMSNorm over each head's queries and keys, has five
sliding layers per global one, and its sliding layers use their own rotary base."""

from __future__ import annotations

from dataclasses import replace

from shard.layers.attention import LayerAttention
from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, LayerSpec, rope_spec, standard_spec, window_of

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    raw = config.raw
    activation = raw.get("hidden_activation") or config.hidden_act
    if activation == "gelu":  # Gemma 1's configs say gelu and mean the tanh approximation
        activation = "gelu_pytorch_tanh"
    spec = standard_spec(config, norm_offset=1.0, tie_word_embeddings=True)
    spec = replace(
        spec,
        mlp=replace(spec.mlp, activation=activation),
        embedding_scale=config.hidden_size**0.5,
        embedding_scale_rounded=True,
        attention=replace(spec.attention, norm_offset=1.0),
    )
    if config.architecture == "GemmaForCausalLM":
        return spec
    attention = replace(
        spec.attention,
        scale=raw["query_pre_attn_scalar"] ** -0.5,
        softcap=raw.get("attn_logit_softcapping"),
        qk_norm="head" if config.architecture == "Gemma3ForCausalLM" else None,
    )
    layers = tuple(
        LayerSpec(LayerAttention(window_of(config, i), rope_spec(config, config.layer_type(i))))
        for i in range(config.num_layers)
    )
    return replace(
        spec,
        attention=attention,
        layers=layers,
        norm_layout="sandwich",
        final_softcap=raw.get("final_logit_softcapping"),
    )
