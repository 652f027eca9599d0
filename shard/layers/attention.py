"""Self-attention of one decoder layer: fused QKV projection, rotary, write K/V to the paged
cache, attend through the step's attention backend, output projection. Heads are split across
tensor-parallel ranks by KV head groups."""

from __future__ import annotations

import torch
from torch import nn

from shard.forward_context import ForwardContext
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from shard.layers.rotary import apply_rotary
from shard.models.config import ModelConfig
from shard.weights import Weights


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, weights: Weights, prefix: str, layer_index: int):
        super().__init__()
        world = weights.dist.world_size
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // world
        self.num_kv_heads = max(config.num_kv_heads // world, 1)  # replicated when fewer
        self.scale = config.head_dim**-0.5
        self.qkv_proj = ColumnParallelLinear.load_qkv(
            weights, prefix, config.num_kv_heads, bias=config.attention_bias
        )
        # Qwen2 has biases on q, k, v only; Llama's attention_bias puts one on o_proj too.
        o_bias = config.attention_bias and weights.has(f"{prefix}.o_proj.bias")
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", bias=o_bias)
        self.split = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        cache = ctx.kv_cache[self.layer_index]
        cache.write(k, v, ctx.attn.slots)
        out = ctx.backend.forward(q, cache, ctx.attn, self.scale)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
