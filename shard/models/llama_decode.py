"""The Llama decoder stack in one C call (llama_decode.c) on the CPU with quantized weights.
Written for the steps a single user waits on, decode steps of a few sequences bound by memory
bandwidth, where eager PyTorch spent as long dispatching ~2,800 small operators as in the
products.

In batch-invariant mode (the default, shard/numerics.py) it runs every step of the model:
prefill, mixed and decode steps of any size, so that a token's numbers never depend on which
path its step took. Otherwise it runs decode steps of up to llama_decode_max_rows sequences.
The eager layers of llama.py stay the reference and run everything it cannot (dense weights,
tensor parallelism, other devices); the tests check that both give the same logits. The
library is built like the quantized kernels (gcc, cached per CPU); where it cannot be, the
eager layers run everything.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from shard.attention.paged_decode import KV_TYPES, PagedKV, paged_kv
from shard.attention.paged_decode import SOURCE as ATTENTION_SOURCE
from shard.engine.forward_context import ForwardContext
from shard.native import SIMD_HEADER, load_library
from shard.numerics import batch_invariant
from shard.quant.kernels import KIND_CODES, NativeKernels, get_kernels
from shard.quant.kernels import SOURCE as KERNELS_SOURCE
from shard.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("llama_decode.c")
DTYPES = (torch.float32, torch.bfloat16)  # of the model's activations
_ptr, _int, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class QMatrix(ctypes.Structure):  # llama_decode.c's QMatrix
    _fields_ = [
        ("kind", _int), ("group", _int), ("N", _int), ("K", _int),
        ("qs", _ptr), ("scale", _ptr), ("min", _ptr), ("bias", _ptr),
    ]  # fmt: skip


class DecoderLayer(ctypes.Structure):  # llama_decode.c's DecoderLayer
    _fields_ = [
        ("input_norm", _ptr), ("post_norm", _ptr),
        ("qkv", QMatrix), ("o", QMatrix), ("gate_up", QMatrix), ("down", QMatrix),
        ("q_norm", _ptr), ("k_norm", _ptr), ("rope", _int), ("window", _int),
    ]  # fmt: skip


class DecodeStep(ctypes.Structure):  # llama_decode.c's DecodeStep
    _fields_ = [
        ("paged", PagedKV), ("T", _int), ("hidden", _int), ("intermediate", _int),
        ("eps", _float), ("residual_scale", _float), ("cos", _ptr), ("sin", _ptr), ("slots", _ptr),
        ("keys", _ptr), ("values", _ptr),
    ]  # fmt: skip


def _float32(t: torch.Tensor | None, keep: list[torch.Tensor]) -> int | None:
    """The address of t as contiguous float32, kept alive in `keep`."""
    if t is None:
        return None
    t = t.detach().to(torch.float32).contiguous()
    keep.append(t)
    return t.data_ptr()


def _qmatrix(w: QuantizedWeight, bias: torch.Tensor | None, keep: list[torch.Tensor]) -> QMatrix:
    return QMatrix(
        KIND_CODES[w.kind], w.group, w.out_features, w.in_features, w.qs.data_ptr(),
        w.scale.data_ptr(), None if w.min is None else w.min.data_ptr(), _float32(bias, keep),
    )  # fmt: skip


def unsupported_block(spec) -> str | None:
    """What in a DecoderSpec the C decoder does not implement: it runs pre-norm layers of
    attention (optionally per-head q/k norms, a sliding window, no rotary) and a SiLU MLP, with
    a residual multiplier; the embedding and logit scalings stay in Python."""
    a = spec.attention
    ropes = {layer.attention.rope for layer in spec.layers} - {None}
    checks = [
        (spec.norm_layout != "pre", f"the {spec.norm_layout} norm layout"),
        (a.qk_norm not in (None, "head") or a.softcap is not None, "q/k norms or soft-capping"),
        (a.qk_norm == "head" and a.norm_eps != spec.norm_eps, "q/k norms of another epsilon"),
        (spec.mlp.activation not in ("silu", "swish"), f"activation {spec.mlp.activation}"),
        (spec.moe is not None, "experts"),
        (len(ropes) != 1, "several rotary tables"),
        (ropes and next(iter(ropes)).rotary_dim != a.head_dim, "partial rotary"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def unsupported_reason(model) -> str | None:
    """Why the compiled decoder cannot run `model` (a DecoderForCausalLM), or None."""
    c, attn = model.config, model.layers[0].self_attn
    block = unsupported_block(model.spec)
    if block is not None:
        return block
    if model.norm.weight.device.type != "cpu":
        return "not on the CPU"
    if model.embed_tokens.dtype not in DTYPES:
        return f"dtype {model.embed_tokens.dtype}"
    if attn.o_proj.dist.world_size != 1:
        return "tensor parallel"
    if c.head_dim % 16 or attn.num_heads % attn.num_kv_heads:
        return f"head_dim {c.head_dim} or the head groups"
    for layer in model.layers:
        linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
        linears += [layer.mlp.gate_up_proj, layer.mlp.down_proj]
        if not all(isinstance(lin.weight, QuantizedWeight) for lin in linears):
            return "weights other than q4/q8 (dense, or GGUF blocks other than Q4_0/Q4_1/Q8_0)"
        if any(lin.weight.perm is not None for lin in linears):
            return "act-order GPTQ (permuted input columns)"
    if not isinstance(get_kernels(), NativeKernels):
        return "no native quantized kernels"
    return None


class CompiledDecoder:
    """Runs every decoder layer of a step through llama_decode.c."""

    def __init__(self, lib: ctypes.CDLL, model, max_rows: int | None = None):
        self._run = lib.llama_decode
        self._run.restype = None
        self._run.argtypes = [_ptr, _int, _ptr, _ptr]
        lib.llama_decode_max_rows.restype = _int
        # the sequences up to which it beats the eager layers on this CPU
        self.max_rows = lib.llama_decode_max_rows() if max_rows is None else max_rows
        self._keep: list[torch.Tensor] = []  # float32 copies of norms and biases
        layers = [self._layer(layer) for layer in model.layers]
        self._layers = (DecoderLayer * len(layers))(*layers)
        c, attn = model.config, model.layers[0].self_attn
        self._dims = dict(
            hidden=c.hidden_size, intermediate=model.spec.mlp.intermediate_size,
            eps=model.spec.norm_eps, residual_scale=model.spec.residual_scale,
        )  # fmt: skip
        self._heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
        self._rotary = model.rotary
        self._cache = None  # the KV cache whose layer addresses _keys/_values hold
        self._keys = self._values = None

    def _layer(self, layer) -> DecoderLayer:
        attn, mlp, keep = layer.self_attn, layer.mlp, self._keep
        return DecoderLayer(
            _float32(layer.norms[0].weight, keep),
            _float32(layer.norms[1].weight, keep),
            _qmatrix(attn.qkv_proj.weight, attn.qkv_proj.bias, keep),
            _qmatrix(attn.o_proj.weight, attn.o_proj.bias, keep),
            _qmatrix(mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, keep),
            _qmatrix(mlp.down_proj.weight, mlp.down_proj.bias, keep),
            None if attn.q_norm is None else _float32(attn.q_norm.weight, keep),
            None if attn.k_norm is None else _float32(attn.k_norm.weight, keep),
            int(attn.layer.rope is not None),
            attn.window or 0,
        )

    def supports(self, x: torch.Tensor, ctx: ForwardContext) -> bool:
        """Over a cache of one of KV_TYPES: any step in batch-invariant mode, else a decode
        step of at most max_rows sequences."""
        if ctx.kv_cache[0].key.dtype not in KV_TYPES:
            return False
        if batch_invariant():
            return True
        return ctx.attn.is_decode_only and x.shape[0] <= self.max_rows

    def _cache_addresses(self, kv_cache) -> None:
        if self._cache is not kv_cache:  # a new cache (warmup sizes it once)
            n = len(kv_cache.layers)
            self._keys = (_ptr * n)(*[layer.key.data_ptr() for layer in kv_cache.layers])
            self._values = (_ptr * n)(*[layer.value.data_ptr() for layer in kv_cache.layers])
            self._cache = kv_cache

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """x [T, hidden] embeddings, positions [T] -> [T, hidden] float32, the last layer's
        output (before the final norm)."""
        cos, sin = self._rotary.cos_sin(positions, torch.float32)  # [T, head_dim / 2]
        x = x.to(torch.float32, copy=True)  # updated in place, layer by layer
        meta = ctx.attn
        self._cache_addresses(ctx.kv_cache)
        step = DecodeStep(
            paged=paged_kv(meta, ctx.kv_cache[0], *self._heads),
            T=x.shape[0], cos=cos.data_ptr(), sin=sin.data_ptr(), slots=meta.slots.data_ptr(),
            keys=ctypes.cast(self._keys, _ptr), values=ctypes.cast(self._values, _ptr),
            **self._dims,
        )  # fmt: skip
        self._run(self._layers, len(self._layers), ctypes.byref(step), x.data_ptr())
        return x


def attach_compiled_decoder(model) -> None:
    """Gives `model` (a DecoderForCausalLM) its compiled decoder where one can run it."""
    model.decoder = compiled_decoder(model)


def compiled_decoder(model) -> CompiledDecoder | None:
    """The compiled decoder of `model`, or None (with the reason logged) where it cannot run."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("decode steps run eager layers: %s", reason)
        return None
    sources = (KERNELS_SOURCE, ATTENTION_SOURCE, SIMD_HEADER)
    lib = load_library(SOURCE, sources, fallback="decode steps stay eager")
    if lib is None:
        return None
    decoder = CompiledDecoder(lib, model)
    if batch_invariant():
        log.info("every step runs the compiled decoder (batch-invariant)")
    else:
        log.info("decode steps of up to %d sequences run the compiled decoder", decoder.max_rows)
    return decoder
