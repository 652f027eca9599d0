"""Rotary position embedding (Su et al.), in the rotate-half layout Hugging Face checkpoints
use, with the scaling variants of the Llama family: none ("default"), "linear", "llama3" and
"dynamic" (NTK-aware: past the trained length the base grows with the longest sequence, as in
transformers and TGI)."""

from __future__ import annotations

import math

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


def rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def scaled_inv_freq(rotary_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = base_inv_freq(rotary_dim, theta)
    rope = rope_type(scaling)
    if rope in ("default", "dynamic"):  # dynamic: unchanged within the trained length
        return inv_freq
    if rope == "linear":
        return inv_freq / scaling["factor"]
    if rope == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"rope scaling type {rope!r} is not supported (default, linear, dynamic, llama3)"
    )


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
        self.inv_freq = scaled_inv_freq(rotary_dim, theta, scaling).to(device)
        self.rotary_dim, self.theta, self.trained_len = rotary_dim, theta, max_positions
        self.dynamic_factor = scaling["factor"] if rope_type(scaling) == "dynamic" else None
        self._build(max_positions)

    def _build(self, max_positions: int) -> None:
        positions = torch.arange(max_positions, device=self.inv_freq.device).float()
        freqs = torch.outer(positions, self.inv_freq)  # [P, rotary_dim // 2]
        self.cos, self.sin = freqs.cos(), freqs.sin()

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
