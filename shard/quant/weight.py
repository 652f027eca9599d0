"""A weight-only quantized matrix, its pure-PyTorch reference, and how to make one.

Two layouts, which are GGUF's Q4_1 and Q8_0 blocks so that a GGUF file is served as stored:

  q4  qs [N, K/2] uint8: in each block of 32 weights, byte j holds weight j in its low nibble
      and weight j + 16 in its high nibble; w = q * scale + min, q in 0..15 (asymmetric).
      GGUF Q4_0 (w = d * (q - 8)) is the same with min = -8 d; GPTQ/AWQ with
      w = (q - zero) * scale is the same with min = -zero * scale.
  q8  qs [N, K] int8; w = q * scale (symmetric).

  scale, min  [N, K / group] float16, one per group of `group` consecutive weights of a row;
              group is a multiple of 32 (32 for GGUF blocks and int4; K for per-channel int8).
              Half precision as GGUF (and GPTQ/AWQ) store them: in float32 they were a third
              of a q4 matrix's bytes, and decode steps of a few sequences are bound by the
              bytes they read.

N is the output features (rows), K the input features, as in torch's Linear weight [N, K].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BLOCK = 32  # weights per packed block (the nibble layout is defined over 32 weights)


@dataclass(frozen=True)
class QuantizedWeight:
    kind: str  # "q4" or "q8"
    qs: torch.Tensor  # q4: [N, K/2] uint8; q8: [N, K] int8
    scale: torch.Tensor  # [N, K / group] float16
    min: torch.Tensor | None  # [N, K / group] float16 for q4; None for q8
    group: int
    # The same matrix dequantized [N, K], kept only where memory is traded for speed: products
    # with many rows use it instead of dequantizing into scratch each time (Quantizer.keep_dense).
    dense: torch.Tensor | None = None
    # GPTQ's act-order: the input columns in the order they were grouped ([K] int64): column j
    # of qs is input feature perm[j], so a product multiplies x[:, perm]. None: in order.
    perm: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in ("q4", "q8"):
            raise ValueError(f"unknown quantized kind {self.kind!r}")
        if self.group % BLOCK or self.in_features % self.group:
            raise ValueError(
                f"group {self.group} must be a multiple of {BLOCK} dividing {self.in_features}"
            )
        if any(t is not None and t.dtype != torch.float16 for t in (self.scale, self.min)):
            raise ValueError("quantized scales and mins are float16")

    @property
    def out_features(self) -> int:  # N
        return self.qs.shape[0]

    @property
    def in_features(self) -> int:  # K
        return self.qs.shape[1] * (2 if self.kind == "q4" else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def nbytes(self) -> int:
        extra = 0 if self.min is None else self.min.nbytes
        return self.qs.nbytes + self.scale.nbytes + extra

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end): a column-parallel shard."""
        return replace(
            self,
            dense=None,
            qs=self.qs[start:end].contiguous(),
            scale=self.scale[start:end].contiguous(),
            min=None if self.min is None else self.min[start:end].contiguous(),
        )

    def columns(self, start: int, end: int) -> "QuantizedWeight":
        """Input columns [start, end): a row-parallel shard; bounds must fall on groups."""
        if self.perm is not None:
            if (start, end) == (0, self.in_features):
                return self
            raise ValueError(
                "act-order GPTQ matrices cannot be split by input columns (tensor parallel)"
            )
        if start % self.group or end % self.group:
            raise ValueError(
                f"columns [{start}, {end}) do not fall on quantization groups of {self.group}"
            )
        per_byte = 2 if self.kind == "q4" else 1
        g0, g1 = start // self.group, end // self.group
        return replace(
            self,
            dense=None,
            qs=self.qs[:, start // per_byte : end // per_byte].contiguous(),
            scale=self.scale[:, g0:g1].contiguous(),
            min=None if self.min is None else self.min[:, g0:g1].contiguous(),
        )

    def fuses_with(self, other: "QuantizedWeight") -> bool:
        """Whether the two can be one matrix (cat_rows): the same layout and column order."""
        same_perm = (self.perm is None and other.perm is None) or (
            self.perm is not None and other.perm is not None and torch.equal(self.perm, other.perm)
        )
        return self.kind == other.kind and self.group == other.group and same_perm

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Fuses matrices along the output rows (q|k|v, gate|up)."""
        first = parts[0]
        if any(not first.fuses_with(p) for p in parts):
            raise ValueError("cannot fuse matrices quantized differently")
        return replace(
            first,
            dense=None,
            qs=torch.cat([p.qs for p in parts]),
            scale=torch.cat([p.scale for p in parts]),
            min=None if first.min is None else torch.cat([p.min for p in parts]),
        )


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15, in weight order."""
    n = qs.shape[0]
    blocks = qs.view(n, -1, BLOCK // 2)  # [N, K/32, 16]
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).view(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers 0..15 -> [N, K/2] uint8 (the inverse of unpack_nibbles)."""
    n = q.shape[0]
    blocks = q.to(torch.uint8).view(n, -1, BLOCK)  # [N, K/32, 32]
    return (blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)).view(n, -1)


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: the dense [N, K] matrix the kernels multiply by."""
    n, k = w.shape
    q = unpack_nibbles(w.qs) if w.kind == "q4" else w.qs
    q = q.float().view(n, k // w.group, w.group)
    dense = q * w.scale.float().unsqueeze(-1)
    if w.min is not None:
        dense = dense + w.min.float().unsqueeze(-1)
    dense = dense.view(n, k)
    if w.perm is not None:  # back to the input features' order
        dense = torch.empty_like(dense).index_copy_(1, w.perm, dense)
    return dense.to(dtype)


def quantize(weight: torch.Tensor, kind: str, group: int) -> QuantizedWeight:
    """Round-to-nearest quantization of a dense [N, K] matrix: q4 asymmetric per group
    (min/max, as GGUF Q4_1), q8 symmetric per group (absmax, as Q8_0; group = K is per
    channel). Scales and mins are rounded to float16 first, and the weights to those."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    if kind == "q8":
        scale = (w.abs().amax(-1) / 127.0).half()
        q = torch.round(w / scale.float().clamp_min(1e-12).unsqueeze(-1)).clamp(-127, 127)
        return QuantizedWeight("q8", q.to(torch.int8).view(n, k), scale.contiguous(), None, group)
    if kind == "q4":
        low = w.amin(-1).half()
        scale = ((w.amax(-1) - low.float()) / 15.0).half()
        q = (w - low.float().unsqueeze(-1)) / scale.float().clamp_min(1e-12).unsqueeze(-1)
        q = torch.round(q).clamp(0, 15).view(n, k)
        return QuantizedWeight("q4", pack_nibbles(q), scale.contiguous(), low.contiguous(), group)
    raise ValueError(f"unknown quantized kind {kind!r}")
