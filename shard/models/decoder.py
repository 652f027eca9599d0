"""The decoder-only transformer every native family is an instance of, built from the shared
blocks in shard/layers/: token embedding (optionally scaled), N layers of attention and an MLP
or a mixture of experts with their norms, a final norm, the LM head (optionally soft-capped or
scaled). A family's file in shard/models/ reads its config.json into a DecoderSpec; nothing
else differs between families.

Norm layouts (x is the residual stream):
  pre       x += attn(norm1(x));              x += mlp(norm2(x))             Llama and most
  sandwich  x += norm2(attn(norm1(x)));       x += norm4(mlp(norm3(x)))      Gemma 2 and 3
  post      x += norm1(attn(x));              x += norm2(mlp(x))             OLMo 2
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from shard.checkpoint.weights import Weights
from shard.engine.forward_context import ForwardContext
from shard.layers.attention import Attention, AttentionSpec, LayerAttention
from shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shard.layers.layernorm import RMSNorm
from shard.layers.mlp import MLP, MlpSpec
from shard.layers.moe import MoeSpec, SparseMoE
from shard.layers.rotary import RopeSpec, RotaryEmbedding, rope_type
from shard.models.config import ModelConfig, rope_parameters

NORM_NAMES = {  # checkpoint names of each layout's norms, in the order the layer applies them
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


@dataclass(frozen=True)
class LayerSpec:
    attention: LayerAttention
    moe: bool = False  # this layer's MLP is the family's mixture of experts


@dataclass(frozen=True)
class DecoderSpec:
    attention: AttentionSpec
    layers: tuple[LayerSpec, ...]
    mlp: MlpSpec
    moe: MoeSpec | None = None
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma: norms scale by (1 + weight)
    norm_layout: str = "pre"
    embedding_scale: float | None = None  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    embedding_scale_rounded: bool = False  # Gemma rounds the scale to the activations' dtype
    residual_scale: float = 1.0  # Granite: each block's output times residual_multiplier
    logit_divisor: float = 1.0  # Granite: logits_scaling
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    tie_word_embeddings: bool = False
    no_tensor_parallel: str | None = None  # why the family cannot split across ranks


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: LayerSpec, weights: Weights, index: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.layout, self.residual_scale = spec.norm_layout, spec.residual_scale
        self.norms = nn.ModuleList(
            RMSNorm.load(weights, f"{prefix}.{name}", spec.norm_eps, spec.norm_offset)
            for name in NORM_NAMES[spec.norm_layout]
        )
        self.self_attn = Attention(
            spec.attention, layer.attention, weights, f"{prefix}.self_attn", index
        )
        if layer.moe:
            self.mlp = SparseMoE(spec.moe, weights, f"{prefix}.{spec.moe.block}")
        else:
            self.mlp = MLP(spec.mlp, weights, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, hidden]
        n = self.norms
        if self.layout == "pre":
            x = self._add(x, self.self_attn(n[0](x), ctx))
            return self._add(x, self.mlp(n[1](x)))
        if self.layout == "sandwich":
            x = self._add(x, n[1](self.self_attn(n[0](x), ctx)))
            return self._add(x, n[3](self.mlp(n[2](x))))
        x = self._add(x, n[0](self.self_attn(x, ctx)))  # post
        return self._add(x, n[1](self.mlp(x)))

    def _add(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return x + (block if self.residual_scale == 1.0 else block * self.residual_scale)


class DecoderForCausalLM(nn.Module):
    implementation = "native"

    def __init__(self, config: ModelConfig, spec: DecoderSpec, weights: Weights):
        super().__init__()
        self.config, self.spec = config, spec
        self.embed_tokens = VocabParallelEmbedding.load(weights, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(
            DecoderLayer(spec, layer, weights, i) for i, layer in enumerate(spec.layers)
        )
        self.norm = RMSNorm.load(weights, "model.norm", spec.norm_eps, spec.norm_offset)
        if spec.tie_word_embeddings or not weights.has("lm_head.weight"):
            self.lm_head = ParallelLMHead.tied(self.embed_tokens, weights, "model.embed_tokens")
        else:
            self.lm_head = ParallelLMHead.load(weights, "lm_head")
        ropes = dict.fromkeys(s.attention.rope for s in spec.layers if s.attention.rope)
        self.rotaries = {rope: RotaryEmbedding.from_spec(rope, weights.device) for rope in ropes}
        self.decoder = None  # the compiled CPU decoder, where it can run (shard/models/__init__)

    @property
    def rotary(self) -> RotaryEmbedding | None:
        """The first rotary table (dynamic scaling and CUDA graphs ask it)."""
        return next(iter(self.rotaries.values()), None)

    @property
    def window_size(self) -> int | None:
        """The sliding window when every layer has the same one (Mistral's), else None."""
        windows = {layer.attention.window for layer in self.spec.layers}
        return windows.pop() if len(windows) == 1 else None

    @property
    def num_kv_heads(self) -> int:  # this rank's KV heads in every layer's cache
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.attention.head_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        x = self.embed_tokens(input_ids)
        scale = self.spec.embedding_scale
        if scale is None:
            return x
        if self.spec.embedding_scale_rounded:
            return x * torch.tensor(scale, dtype=x.dtype)
        return x * scale

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (after the final norm)."""
        x = self.embed(input_ids)
        for rotary in self.rotaries.values():
            rotary.ensure(ctx.attn.max_seq_len)
        if self.decoder is not None and self.decoder.supports(x, ctx):
            return self.norm(self.decoder.forward(x, positions, ctx).to(x.dtype))
        ctx.rotary = {
            rope: rotary.cos_sin(positions, x.dtype) for rope, rotary in self.rotaries.items()
        }
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] fp32
        logits = self.lm_head(hidden)
        if self.spec.logit_divisor != 1.0:
            logits = logits / self.spec.logit_divisor
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def rope_spec(config: ModelConfig, layer_type: str = "full_attention") -> RopeSpec:
    """The rotary table of `layer_type`'s layers (Gemma 3's sliding layers have their own)."""
    rope = rope_parameters(config.raw, layer_type) if config.raw else {}
    theta = rope.pop("rope_theta", None) or config.rope_theta
    rope.pop("partial_rotary_factor", None)
    scaling = config.rope_scaling if layer_type == "full_attention" or not config.raw else rope
    if rope_type(scaling) == "default":
        scaling = {}
    if rope_type(scaling) == "longrope" and "original_max_position_embeddings" not in scaling:
        original = config.raw.get("original_max_position_embeddings")
        scaling = {**scaling, "original_max_position_embeddings": original}
    rotary_dim = int(config.head_dim * config.partial_rotary_factor)
    return RopeSpec.of(rotary_dim, theta, scaling, config.max_position_embeddings)


def window_of(config: ModelConfig, index: int) -> int | None:
    """Layer `index`'s sliding window (None: it attends to every position)."""
    if config.layer_type(index) != "sliding_attention":
        return None
    return config.sliding_window


def standard_layers(config: ModelConfig, moe: bool = False) -> tuple[LayerSpec, ...]:
    """Every layer windowed as config.json says, with the full-attention rotary table."""
    return tuple(
        LayerSpec(LayerAttention(window_of(config, i), rope_spec(config)), moe=moe)
        for i in range(config.num_layers)
    )


def standard_spec(config: ModelConfig, **changes) -> DecoderSpec:
    """Llama's decoder as `config` describes it; a family changes what differs."""
    attention = AttentionSpec(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        scale=config.head_dim**-0.5,
        qkv_bias=config.attention_bias,
        o_bias=config.attention_bias,
        norm_eps=config.rms_norm_eps,
    )
    spec = DecoderSpec(
        attention=attention,
        layers=standard_layers(config),
        mlp=MlpSpec(config.intermediate_size, config.hidden_act, config.mlp_bias),
        norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    return replace(spec, **changes)
