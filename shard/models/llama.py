"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): pre-norm decoder layers of grouped-
query attention and a gated MLP, RMSNorm, rotary positions, optionally tied LM head."""

from __future__ import annotations

import torch
from torch import nn

from shard.forward_context import ForwardContext
from shard.layers.activation import silu_and_mul
from shard.layers.attention import Attention
from shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shard.layers.layernorm import RMSNorm
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from shard.layers.rotary import RotaryEmbedding
from shard.models.config import ModelConfig
from shard.models.llama_decode import compiled_decoder
from shard.weights import Weights


class MLP(nn.Module):
    def __init__(self, weights: Weights, prefix: str):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear.load(
            weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        )
        self.down_proj = RowParallelLinear.load(weights, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, weights: Weights, index: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm.load(weights, f"{prefix}.input_layernorm", eps)
        self.self_attn = Attention(config, weights, f"{prefix}.self_attn", index)
        self.post_attention_layernorm = RMSNorm.load(
            weights, f"{prefix}.post_attention_layernorm", eps
        )
        self.mlp = MLP(weights, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, hidden]
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding.load(weights, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(
            DecoderLayer(config, weights, i) for i in range(config.num_layers)
        )
        self.norm = RMSNorm.load(weights, "model.norm", config.rms_norm_eps)
        if config.tie_word_embeddings or not weights.has("lm_head.weight"):
            self.lm_head = ParallelLMHead.tied(self.embed_tokens, weights, "model.embed_tokens")
        else:
            self.lm_head = ParallelLMHead.load(weights, "lm_head")
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            weights.device,
        )
        # Decode steps of a few sequences in one C call, where the weights allow (else None).
        self.decoder = compiled_decoder(self)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (after the final norm)."""
        x = self.embed_tokens(input_ids)
        self.rotary.ensure(ctx.attn.max_seq_len)
        if self.decoder is not None and self.decoder.supports(x, ctx):
            cos, sin = self.rotary.cos_sin(positions, torch.float32)
            return self.norm(self.decoder.forward(x, cos, sin, ctx).to(x.dtype))
        ctx.cos, ctx.sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] fp32
        return self.lm_head(hidden)
