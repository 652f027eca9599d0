"""Qwen3 and Qwen3-MoE (Qwen team, 2025): Qwen2's decoder without the q/k/v biases, with an
RMSNorm over each head's queries and keys before rotary. Qwen3-MoE replaces the MLP of its
sparse layers (every decoder_sparse_step-th, except mlp_only_layers) by a mixture of
num_experts experts of which num_experts_per_tok run per token; their weights renormalized
only with norm_topk_prob."""

from __future__ import annotations

from dataclasses import replace

from shard.layers.mlp import MlpSpec
from shard.layers.moe import MoeSpec
from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_spec

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    spec = standard_spec(config)
    spec = replace(spec, attention=replace(spec.attention, qk_norm="head"))
    if config.architecture != "Qwen3MoeForCausalLM":
        return spec
    raw = config.raw
    experts = raw.get("num_experts") or raw["num_local_experts"]
    moe = MoeSpec(
        num_experts=experts,
        top_k=raw["num_experts_per_tok"],
        expert=MlpSpec(raw["moe_intermediate_size"], config.hidden_act),
        normalize=bool(raw.get("norm_topk_prob", False)),
    )
    step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers") or ())
    layers = tuple(
        replace(layer, moe=i not in dense and experts > 0 and (i + 1) % step == 0)
        for i, layer in enumerate(spec.layers)
    )
    return replace(spec, moe=moe, layers=layers)
