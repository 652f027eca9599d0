"""Self-attention of one decoder layer: fused QKV projection, optional q/k norms, rotary, write
K/V to the paged cache, attend through the step's attention backend (with the layer's sliding
window and score soft-capping), output projection. Heads are split across tensor-parallel
ranks by KV head groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shard.checkpoint.weights import Weights
from shard.engine.forward_context import ForwardContext
from shard.layers.layernorm import RMSNorm
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from shard.layers.rotary import RopeSpec, apply_rotary, apply_rotary_reference


@dataclass(frozen=True)
class AttentionSpec:
    """What differs between the families' attention blocks."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # of the scores: head_dim^-0.5, Gemma's query_pre_attn_scalar^-0.5, Granite's
    qkv_bias: bool = False
    o_bias: bool = False
    # "head": an RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3); "full": over
    # the whole q and k projections (OLMo 2); None: none
    qk_norm: str | None = None
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma's norms scale by (1 + weight)
    fused_qkv: bool = False  # the checkpoint holds one qkv_proj (Phi-3)
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)


@dataclass(frozen=True)
class LayerAttention:
    """What one layer adds to its family's attention: its window and its rotary table."""

    window: int | None = None  # attends to the last `window` positions (its own included)
    rope: RopeSpec | None = None  # None: no rotary (SmolLM3's NoPE layers)


class Attention(nn.Module):
    def __init__(
        self,
        spec: AttentionSpec,
        layer: LayerAttention,
        weights: Weights,
        prefix: str,
        layer_index: int,
    ):
        super().__init__()
        world = weights.dist.world_size
        self.spec, self.layer, self.layer_index = spec, layer, layer_index
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads // world
        self.num_kv_heads = max(spec.num_kv_heads // world, 1)  # replicated when fewer
        self.scale = spec.scale
        self.window, self.softcap = layer.window, spec.softcap
        if spec.fused_qkv:
            self.qkv_proj = ColumnParallelLinear.load_fused_qkv(
                weights, f"{prefix}.qkv_proj", spec.num_heads, spec.num_kv_heads, spec.head_dim
            )
        else:
            self.qkv_proj = ColumnParallelLinear.load_qkv(
                weights, prefix, spec.num_kv_heads, bias=spec.qkv_bias
            )
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", bias=spec.o_bias)
        self.q_norm = self.k_norm = None
        if spec.qk_norm is not None:
            eps, offset = spec.norm_eps, spec.norm_offset  # "full": one rank (see olmo2.py)
            self.q_norm = RMSNorm.load(weights, f"{prefix}.q_norm", eps, offset)
            self.k_norm = RMSNorm.load(weights, f"{prefix}.k_norm", eps, offset)
        self.split = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        if self.spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.spec.qk_norm == "head":
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        if self.layer.rope is not None:
            cos, sin = ctx.rotary[self.layer.rope]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        cache = ctx.kv_cache[self.layer_index]
        cache.write(k, v, ctx.attn.slots)
        out = ctx.backend.forward(  # [T, heads, head_dim]
            q, cache, ctx.attn, self.scale, window=self.window, softcap=self.softcap
        )
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, rotary_dim // 2]: rotary over the first rotary_dim
    features (all of them, or Phi-4-mini's partial rotary)."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    rotated = apply_rotary_reference(x[..., :rotary_dim], cos, sin)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
