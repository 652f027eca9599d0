"""Which quantization a shard serves with, and how each kind of checkpoint becomes
QuantizedWeight matrices.

`--quantize` values (TGI's flag and QUANTIZE env var; TGI has no CPU int4, so `int4` is ours):
  int8, eetq  int8 per output channel, round-to-nearest from a dense checkpoint (TGI's eetq is
              exactly this scheme)
  int4        4-bit asymmetric groups of 32 (as GGUF Q4_1) from a dense checkpoint; the LM head
              is kept at int8 groups of 32, as llama.cpp keeps its output layer at 6-8 bits
  gguf        a GGUF file's own blocks, kept as they are: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
              K-quants Q2_K..Q6_K (shard/checkpoint/gguf_weights.py; the default for a GGUF
              model, the embedded one included); other GGUF types are served dense
  gptq, awq   4-bit checkpoints (`quantization_config` in config.json: detected, so the flag
              is optional); their groups map exactly to the int4 layout
  none        dense weights in --dtype
Any other checkpoint quantization (fp8, bitsandbytes, compressed-tensors, ...) is refused at
start-up: loading it as if dense would drop its scales and serve garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shard.quant.weight import QuantizedWeight, dequantize, pack_nibbles, quantize

METHODS = ("none", "int8", "eetq", "int4", "gguf", "gptq", "awq")
GGUF_LINK = "model.gguf"  # a GGUF model directory's link to its file (shard.checkpoint.convert)
INT4_GROUP = 32
LM_HEAD = "lm_head"


class QuantizationError(ValueError):
    pass


def checkpoint_quantization(model_dir: Path) -> dict | None:
    """config.json's `quantization_config`, if any."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        return None
    return json.loads(config_path.read_text()).get("quantization_config")


def resolve_method(requested: str | None, model_dir: Path) -> str:
    """The method to serve with: the request checked against what the checkpoint holds.
    Without a request: the checkpoint's own (GPTQ/AWQ, a GGUF file's blocks), else none."""
    if requested is None:
        has_blocks = (Path(model_dir) / GGUF_LINK).exists()
        requested = "gguf" if has_blocks and checkpoint_quantization(model_dir) is None else "none"
    requested = requested.lower()
    if requested not in METHODS:
        raise QuantizationError(
            f"--quantize {requested!r} is not supported on the CPU; choose one of "
            f"{', '.join(METHODS)}"
        )
    stored = checkpoint_quantization(model_dir)
    if stored is not None:
        method = str(stored.get("quant_method", "")).lower()
        if method not in ("gptq", "awq"):
            raise QuantizationError(
                f"the checkpoint is quantized with {method or 'an unnamed method'!r}, which "
                "cannot be served on the CPU (supported: gptq and awq, 4 bits); serve a dense "
                "checkpoint, optionally with --quantize int8 or int4"
            )
        if requested not in ("none", method):
            raise QuantizationError(
                f"the checkpoint is {method}-quantized; --quantize {requested} cannot apply"
            )
        _check_int4_config(stored)
        return method
    if requested in ("gptq", "awq"):
        raise QuantizationError(f"--quantize {requested} needs a {requested} checkpoint")
    if requested == "gguf" and not (Path(model_dir) / GGUF_LINK).exists():
        raise QuantizationError("--quantize gguf needs a model converted from a .gguf file")
    return "eetq" if requested == "int8" else requested


def _check_int4_config(config: dict) -> None:
    bits = config.get("bits", config.get("w_bit", 4))
    group = config.get("group_size", config.get("q_group_size", 128))
    method = config.get("quant_method")
    if bits not in (4, 8) or (bits == 8 and method != "gptq"):
        raise QuantizationError(
            f"{method} checkpoints of {bits} bits cannot be served (GPTQ: 4 or 8, AWQ: 4)"
        )
    if group != -1 and group % 32:
        raise QuantizationError(f"group size {group} is not a multiple of 32")
    if config.get("quant_method") == "awq" and config.get("version", "gemm").lower() != "gemm":
        raise QuantizationError("only AWQ's GEMM packing is supported")


@dataclass
class Quantizer:
    """Loads the whole matrix `prefix.weight` quantized, or returns None to keep it dense.

    keep_dense: also keep each quantized matrix dequantized in the model dtype, for steps of
    many rows (see shard/quant/kernels.py). The fastest setting, at the dense model's memory
    plus the quantized one's: the default where quantization was not asked for (a GGUF model
    served without --quantize); an explicit --quantize keeps only the quantized weights."""

    method: str
    model_dir: Path
    keep_dense: bool = False

    def __post_init__(self):
        config = checkpoint_quantization(self.model_dir) or {}
        self._checkpoint_format = config.get("checkpoint_format", "gptq")
        self._bits = config.get("bits", 4)

    def finish(self, matrix: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        """A layer's final matrix (after fusing and sharding), with its dense copy if kept."""
        return replace(matrix, dense=dequantize(matrix, dtype)) if self.keep_dense else matrix

    def load(self, weights, prefix: str) -> QuantizedWeight | None:
        if self.method in ("eetq", "int4"):
            dense = weights.get_full(f"{prefix}.weight", torch.float32)
            if self.method == "eetq":
                return quantize(dense, "q8", dense.shape[1])
            lm_head = prefix == LM_HEAD or prefix.endswith(".embed_tokens")
            return quantize(dense, "q8" if lm_head else "q4", INT4_GROUP)
        if self.method == "gguf":  # weights: a GGUFWeights
            return weights.file_matrix(prefix)
        if self.method in ("gptq", "awq") and weights.has(f"{prefix}.qweight"):
            return self._int_checkpoint(weights, prefix)
        return None

    def _int_checkpoint(self, weights, prefix: str) -> QuantizedWeight:
        """A GPTQ (4 or 8 bits, act-order too) or AWQ (4 bits) matrix, w = (q - zero) scale."""
        qweight = weights.get_raw(f"{prefix}.qweight")
        qzeros = weights.get_raw(f"{prefix}.qzeros")
        scales = weights.get_raw(f"{prefix}.scales").float()  # [K / group, N]
        bits = 4 if self.method == "awq" else self._bits
        perm = None
        if self.method == "gptq":
            q = unpack_int32(qweight, dim=0, bits=bits)  # [K, N]
            zeros = unpack_int32(qzeros, dim=1, bits=bits)  # [K / group, N]
            if self._checkpoint_format != "gptq_v2":
                zeros = zeros + 1  # GPTQ v1 stores zero - 1
            perm = _act_order(weights, prefix, q.shape[0], scales.shape[0])
            if perm is not None:  # the groups' columns side by side: x[:, perm] meets them
                q = q[perm]
        else:
            q = unpack_int32(qweight, dim=1, order=AWQ_ORDER)  # [K, N]
            zeros = unpack_int32(qzeros, dim=1, order=AWQ_ORDER)
        k = q.shape[0]
        group = k // scales.shape[0]
        scale = scales.t().half().contiguous()  # [N, K / group]
        if bits == 8:  # symmetric only: q - 128 is the int8 value, scale its step
            if not bool((zeros == 128).all()):
                raise QuantizationError(
                    f"{prefix}: asymmetric 8-bit GPTQ (zero points other than 128) cannot be "
                    "served; quantize with sym=True"
                )
            q8 = (q - 128).to(torch.int8).t().contiguous()
            return QuantizedWeight("q8", q8, scale, None, group, perm=perm)
        # -zero * scale needs up to 15 significant bits: float16 rounds it by at most 2^-11
        # of 15 * scale, under a 270th of a quantization step.
        low = (-zeros.float() * scales).t().half().contiguous()
        return QuantizedWeight("q4", pack_nibbles(q.t().contiguous()), scale, low, group, perm=perm)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM kernels interleave the 8 nibbles of a word


def unpack_int32(
    packed: torch.Tensor, dim: int, order: tuple[int, ...] | None = None, bits: int = 4
) -> torch.Tensor:
    """int32 words of 32 / bits values along `dim` -> the values [.., x, ..] (int32 0..2^bits-1).
    Field i of a word (bits bits*i ..) holds value order[i] of its 32 / bits."""
    per_word = 32 // bits
    order = tuple(range(per_word)) if order is None else order
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per_word]: field i
    values = fields[..., torch.tensor(order).argsort()]  # [..., per_word]: value j
    if dim == 0:  # [K / per_word, N, per_word] -> [K, N]
        return values.permute(0, 2, 1).reshape(-1, packed.shape[1])
    return values.reshape(packed.shape[0], -1)  # [R, N / per_word, per_word] -> [R, N]


def _act_order(weights, prefix: str, k: int, groups: int) -> torch.Tensor | None:
    """GPTQ's act-order (desc_act): g_idx [K] gives each input column's group. None where the
    groups are the columns in order; else the permutation that sorts the columns by group."""
    if not weights.has(f"{prefix}.g_idx"):
        return None
    g_idx = weights.get_raw(f"{prefix}.g_idx").long()
    if torch.equal(g_idx, torch.arange(k) // (k // groups)):
        return None
    if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.full((groups,), k // groups)):
        raise QuantizationError(f"{prefix}: g_idx does not give every group {k // groups} columns")
    return torch.argsort(g_idx, stable=True)
