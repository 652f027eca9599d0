"""Rotary position embedding (Su et al.), in the rotate-half layout Hugging Face checkpoints
use, with the scaling variants the families we serve use: none ("default"), "linear",
"llama3", "dynamic" (NTK-aware: past the trained length the base grows with the longest
sequence, as in transformers and TGI), "yarn" (Qwen2.5, DeepSeek) and "longrope" (Phi-3.5/4).
yarn and longrope also scale cos and sin by an attention factor. A rotary dimension below the
head size (Phi-4-mini's partial_rotary_factor) rotates the first rotary_dim features only.

longrope: transformers switches every position to the long factors once a sequence grows past
original_max_position_embeddings, which changes the keys already cached. Here a position's
rotation depends on the position alone (short factors below that length, long ones from it),
so a token's numbers never depend on how long its sequence has grown: equal to transformers
within the original length."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shard.layers.fused import fused_ops


def base_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:  # [rotary_dim // 2]
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Long wavelengths slowed down by `factor`, short ones kept, a smooth blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def dynamic_inv_freq(
    rotary_dim: int, theta: float, factor: float, seq_len: int, trained_len: int
) -> torch.Tensor:
    """NTK-aware scaling for sequences of `seq_len` > `trained_len` positions."""
    ratio = factor * seq_len / trained_len - (factor - 1)
    return base_inv_freq(rotary_dim, theta * ratio ** (rotary_dim / (rotary_dim - 2)))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(rotary_dim: int, theta: float, scaling: dict, trained_len: int):
    """YaRN (Peng et al.): interpolated low frequencies, extrapolated high ones, a linear ramp
    between the dimensions of beta_fast and beta_slow rotations. -> (inv_freq, attention factor)"""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or trained_len
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(fast), dimension(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavelengths = theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    keep = 1 - ramp  # 1: the dimension keeps its frequency
    inv_freq = 1.0 / (factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention = yarn_mscale(factor)
    return inv_freq, float(attention)


def longrope_attention_factor(scaling: dict, trained_len: int) -> float:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or trained_len / original
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_inv_freq(rotary_dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)


def rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def check_rope_type(scaling: dict) -> None:
    if rope_type(scaling) not in ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type(scaling)!r} is not supported ({', '.join(ROPE_TYPES)})"
        )


def scaled_inv_freq(
    rotary_dim: int, theta: float, scaling: dict, trained_len: int = 2048
) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [rotary_dim // 2], the factor cos and sin are multiplied by); longrope's
    short factors (its long ones: RotaryEmbedding)."""
    check_rope_type(scaling)
    inv_freq = base_inv_freq(rotary_dim, theta)
    rope = rope_type(scaling)
    if rope in ("default", "dynamic"):  # dynamic: unchanged within the trained length
        return inv_freq, 1.0
    if rope == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope == "llama3":
        return llama3_inv_freq(inv_freq, scaling), 1.0
    if rope == "yarn":
        return yarn_inv_freq(rotary_dim, theta, scaling, trained_len)
    factor = longrope_attention_factor(scaling, trained_len)
    return longrope_inv_freq(rotary_dim, theta, scaling["short_factor"]), factor


@dataclass(frozen=True)
class RopeSpec:
    """One rotary table: the layers that share it share its cos/sin for a step."""

    rotary_dim: int
    theta: float
    scaling: tuple = ()  # sorted (key, value) pairs of rope_scaling, hashable
    max_positions: int = 2048  # the trained length (dynamic and longrope)

    @classmethod
    def of(cls, rotary_dim: int, theta: float, scaling: dict, max_positions: int) -> "RopeSpec":
        check_rope_type(scaling)
        items = tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())
        )
        return cls(rotary_dim, float(theta), items, max_positions)

    @property
    def scaling_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.scaling}


class RotaryEmbedding:
    """Holds a cos/sin table for positions [0, max_positions), grown on demand. With dynamic
    scaling, a sequence longer than max_positions (the trained length) rebuilds the whole table
    with a larger base, as TGI does: keys already cached keep their old rotation."""

    def __init__(
        self,
        rotary_dim: int,
        theta: float,
        scaling: dict,
        max_positions: int,
        device: torch.device | str = "cpu",
    ):
        inv_freq, self.attention_factor = scaled_inv_freq(rotary_dim, theta, scaling, max_positions)
        self.inv_freq = inv_freq.to(device)
        self.rotary_dim, self.theta, self.trained_len = rotary_dim, theta, max_positions
        self.dynamic_factor = scaling["factor"] if rope_type(scaling) == "dynamic" else None
        self.long = None  # longrope: (from this position, its long inv_freq)
        if rope_type(scaling) == "longrope":
            long = longrope_inv_freq(rotary_dim, theta, scaling["long_factor"]).to(device)
            self.long = (scaling["original_max_position_embeddings"], long)
        self._build(max_positions)

    @classmethod
    def from_spec(cls, spec: RopeSpec, device: torch.device | str = "cpu") -> "RotaryEmbedding":
        return cls(spec.rotary_dim, spec.theta, spec.scaling_dict, spec.max_positions, device)

    def _build(self, max_positions: int) -> None:
        positions = torch.arange(max_positions, device=self.inv_freq.device).float()
        freqs = torch.outer(positions, self.inv_freq)  # [P, rotary_dim // 2]
        if self.long is not None and max_positions > self.long[0]:
            start, long = self.long
            freqs[start:] = torch.outer(positions[start:], long)
        self.cos, self.sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            self.cos, self.sin = self.cos * self.attention_factor, self.sin * self.attention_factor

    def ensure(self, num_positions: int) -> None:
        """Makes the table cover positions [0, num_positions)."""
        if num_positions <= self.cos.shape[0]:
            return
        if self.dynamic_factor is None:
            self._build(max(num_positions, 2 * self.cos.shape[0]))
            return
        inv_freq = dynamic_inv_freq(
            self.rotary_dim, self.theta, self.dynamic_factor, num_positions, self.trained_len
        )
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self._build(num_positions)  # exact: the base depends on the length

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [T] (all < the table size) -> cos, sin [T, rotary_dim // 2] in `dtype`."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim // 2]. Rotates (x1, x2) halves; on the
    CPU in place (x is then returned), elsewhere into a new tensor."""
    ops = fused_ops() if x.device.type == "cpu" else None
    if (
        ops is not None
        and x.stride(1) == x.shape[2]
        and cos.is_contiguous()
        and sin.is_contiguous()
        and ops.supports(x, cos, sin)
    ):
        return ops.rotary_(x, cos, sin)  # x is a slice of this step's fused q|k|v output
    return apply_rotary_reference(x, cos, sin)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What apply_rotary computes, in PyTorch ops."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, head_dim // 2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
