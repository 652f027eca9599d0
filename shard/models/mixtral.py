"""Mixtral (Jiang et al., 2024): Mistral's decoder with every MLP replaced by a sparse mixture
of num_local_experts gated experts (w1 gate, w3 up, w2 down), of which num_experts_per_tok run
per token, their router weights renormalized over the chosen ones."""

from __future__ import annotations

from dataclasses import replace

from shard.layers.mlp import MlpSpec
from shard.layers.moe import MoeSpec
from shard.models.config import ModelConfig
from shard.models.decoder import DecoderSpec, standard_layers, standard_spec

ARCHITECTURES = ("MixtralForCausalLM",)


def decoder_spec(config: ModelConfig) -> DecoderSpec:
    raw = config.raw
    moe = MoeSpec(
        num_experts=raw["num_local_experts"],
        top_k=raw["num_experts_per_tok"],
        expert=MlpSpec(config.intermediate_size, config.hidden_act, names=("w1", "w3", "w2")),
        block="block_sparse_moe",
    )
    return replace(standard_spec(config), moe=moe, layers=standard_layers(config, moe=True))
