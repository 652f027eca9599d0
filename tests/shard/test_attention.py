"""Attention backends against a dense reference.

Each case builds per-sequence contiguous K/V and queries, writes K/V into a paged cache at
random non-contiguous blocks (block 0 never handed out; unused blocks hold finite garbage so a
wrong gather shows), runs a backend through prepare/forward, and compares with plain causal
attention computed in float64 straight from the contiguous tensors (never through the cache).
The flash backend runs on the CPU with fakes of flash-attn's two functions, written from their
documented signatures and semantics.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shard import numerics
from shard.attention import get_backend, resolve_backend_name, sdpa
from shard.attention.flash_attn import FlashPagedAttention
from shard.attention.paged_decode import paged_decode_kernel
from shard.attention.sdpa import SdpaPagedAttention, build_step, plan_groups
from shard.attention.torch_ref import TorchReferenceAttention
from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV

REPO = Path(__file__).resolve().parents[2]
HEAD_DIM = 32
HEADS = [(8, 2), (9, 3), (4, 4)]  # (num_heads, num_kv_heads)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

# name -> (query_lens, seq_lens)
CASES = {
    "decode": ([1, 1, 1, 1, 1], [1, 17, 33, 5, 64]),
    "decode_uniform": ([1, 1, 1], [20, 20, 20]),
    "prefill": ([7, 1, 40, 16], [7, 1, 40, 16]),
    "prefill_single": ([37], [37]),
    "prefill_uniform": ([12, 12], [12, 12]),
    "mixed": ([1, 9, 1, 30, 1], [50, 9, 3, 30, 17]),
    "chunked": ([5, 16, 3], [21, 16, 40]),
    "chunked_uniform": ([4, 4], [10, 10]),
    "mixed_grouped": ([1, 1, 64, 1, 3, 64], [40, 90, 64, 100, 70, 80]),  # several SDPA calls
    "long": ([40, 1, 270], [300, 520, 270]),  # spans several 256-blocks
}


@dataclass
class Case:
    q: torch.Tensor  # [T, H, D]
    keys: list[torch.Tensor]  # per sequence [L, KV, D], contiguous
    values: list[torch.Tensor]
    cache: LayerKV
    meta: AttentionMetadata
    scale: float


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    layout_seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> Case:
    """layout_seed picks the block ids, seed the data (same layout_seed = same step); the
    cache is kv_dtype (default dtype), the reference's K/V its rounded values."""
    kv_dtype = kv_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + 4
    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    key_garbage = (torch.randn(shape, generator=gen) * 10).to(kv_dtype)  # finite, never attended
    value_garbage = (torch.randn(shape, generator=gen) * 10).to(kv_dtype)
    cache = LayerKV(key_garbage, value_garbage)
    layout = torch.Generator().manual_seed(layout_seed)
    ids = (torch.randperm(num_blocks - 1, generator=layout) + 1).tolist()  # never block 0
    tables, keys, values, new_slots = [], [], [], []
    for n, length, count in zip(query_lens, seq_lens, needed):
        table, ids = ids[:count], ids[count:]
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(length)]
        )
        k = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen).to(kv_dtype)
        v = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen).to(kv_dtype)
        cache.write(k, v, slots)  # cached context and this step's new tokens alike
        tables.append(table)
        keys.append(k)
        values.append(v)
        new_slots += slots[length - n :].tolist()
    q = torch.randn(sum(query_lens), num_heads, HEAD_DIM, generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, new_slots, block_size)
    return Case(q, keys, values, cache, meta, HEAD_DIM**-0.5)


def dense_reference(case: Case) -> torch.Tensor:
    """Plain causal attention per sequence, float64, from contiguous K/V: [T, H, D]."""
    outs, start = [], 0
    for n, k, v in zip(case.meta.query_lens_list, case.keys, case.values):
        q = case.q[start : start + n].double()  # [n, H, D]
        start += n
        length, num_heads = k.shape[0], q.shape[1]
        group = num_heads // k.shape[1]
        for i in range(n):
            pos = length - n + i  # the query's own position; it sees keys 0..pos
            heads = []
            for h in range(num_heads):
                kh = k[: pos + 1, h // group].double()  # [pos + 1, D]
                vh = v[: pos + 1, h // group].double()
                weights = torch.softmax(kh @ q[i, h] * case.scale, dim=0)  # [pos + 1]
                heads.append(weights @ vh)
            outs.append(torch.stack(heads))  # [H, D]
    return torch.stack(outs)


def run(backend, case: Case) -> torch.Tensor:
    backend.prepare(case.meta)
    return backend.forward(case.q, case.cache, case.meta, case.scale)


def assert_close(out: torch.Tensor, case: Case, dtype: torch.dtype) -> None:
    assert out.shape == case.q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), dense_reference(case), atol=tol, rtol=tol)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "backend_cls", [TorchReferenceAttention, SdpaPagedAttention], ids=lambda c: c.name
)
@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "fast"])
def test_backend_matches_dense_reference(
    backend_cls, dtype, block_size, heads, case_name, invariant
):
    """Batch-invariant, the CPU backend sends every step to the paged kernel; fast, only
    decode steps, the others to its SDPA path."""
    query_lens, seq_lens = CASES[case_name]
    case = make_case(query_lens, seq_lens, *heads, block_size, dtype)
    numerics.configure(batch_invariant=invariant)
    try:
        assert_close(run(backend_cls(), case), case, dtype)
    finally:
        numerics.configure(batch_invariant=True)


@pytest.mark.parametrize("case_name", ["decode", "mixed", "long"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "backend_cls", [TorchReferenceAttention, SdpaPagedAttention], ids=lambda c: c.name
)
@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "fast"])
def test_a_16_bit_cache_under_float32_queries(backend_cls, kv_dtype, case_name, invariant):
    """--kv-cache-dtype: the paged kernel and the SDPA path read a bfloat16 or float16 cache
    under float32 queries, as exactly as the float32 reference over the same stored values."""
    query_lens, seq_lens = CASES[case_name]
    case = make_case(query_lens, seq_lens, 8, 2, 16, torch.float32, kv_dtype=kv_dtype)
    assert case.cache.key.dtype is kv_dtype
    numerics.configure(batch_invariant=invariant)
    try:
        assert_close(run(backend_cls(), case), case, torch.float32)
    finally:
        numerics.configure(batch_invariant=True)


def test_sdpa_same_output_for_every_layer_of_a_step(fast_numerics):
    """One prepare, then several layers: same block tables, different K/V and queries."""
    backend = SdpaPagedAttention()
    lens = CASES["mixed_grouped"]  # several groups share the step's gather workspace
    step = make_case(*lens, 8, 2, 16, torch.float32, seed=1)
    backend.prepare(step.meta)
    prepared = step.meta.prepared["sdpa"]
    assert len(prepared.groups) > 1
    layers = [make_case(*lens, 8, 2, 16, torch.float32, seed=s) for s in (1, 2, 3)]
    outs = [backend.forward(layer.q, layer.cache, step.meta, layer.scale) for layer in layers]
    assert step.meta.prepared["sdpa"] is prepared
    for out, layer in zip(outs, layers):  # earlier outputs survive later layers' gathers
        assert_close(out, layer, torch.float32)


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "expected"),
    [
        ([1] * 16, list(range(280, 312, 2)), [list(range(16))]),  # decode-only: one call
        ([512], [512], [[0]]),  # one prompt: one call
        ([20, 15, 25, 18], [20, 15, 25, 18], [[0, 1, 2, 3]]),  # short prompts: padded together
        ([1, 256, 1, 1], [300, 256, 290, 310], [[1], [0, 2, 3]]),  # mixed: decodes apart
        ([1, 100, 1, 3], [40, 300, 2000, 70], [[1, 3], [0, 2]]),  # a 3-token chunk joins the prompt
    ],
)
def test_sdpa_groups_sequences_to_bound_padding(query_lens, seq_lens, expected):
    assert plan_groups(query_lens, seq_lens) == expected
    case = make_case(query_lens, seq_lens, 4, 2, 16, torch.float32)
    groups = build_step(case.meta).groups
    assert len(groups) == len(expected)
    if len(groups) == 1:  # the whole step: q is used as it is
        assert groups[0].tokens is None


@pytest.mark.parametrize("case_name", ["decode", "decode_uniform", "long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_decode_steps_take_the_paged_kernel(monkeypatch, dtype, case_name):
    """Decode-only steps go to paged_decode.c, and the general path still serves them where
    the kernel cannot be built; both against the dense reference."""
    query_lens, seq_lens = CASES[case_name]
    case = make_case(query_lens, seq_lens, 9, 3, 16, dtype)
    if case.meta.is_decode_only:
        assert paged_decode_kernel() is not None  # gcc is here
        out = run(SdpaPagedAttention(), case)
        assert "paged_decode" in case.meta.prepared and "sdpa" not in case.meta.prepared
        assert_close(out, case, dtype)
    monkeypatch.setattr(sdpa, "paged_decode_kernel", lambda: None)
    case = make_case(query_lens, seq_lens, 9, 3, 16, dtype)
    out = run(SdpaPagedAttention(), case)
    assert "sdpa" in case.meta.prepared and "paged_decode" not in case.meta.prepared
    assert_close(out, case, dtype)


def test_sdpa_prepares_lazily_when_prepare_was_skipped(fast_numerics):
    case = make_case([3, 1], [8, 5], 4, 4, 16, torch.float32)
    out = SdpaPagedAttention().forward(case.q, case.cache, case.meta, case.scale)
    assert "sdpa" in case.meta.prepared
    assert_close(out, case, torch.float32)


# ---- flash: fakes of flash-attn's documented functions -------------------------------------


def _fake_attention(q, k, v, softmax_scale, causal, window_size=(-1, -1), softcap=0.0):
    """One sequence, as flash-attn documents it: q [sq, H, D], k/v [sk, KV, D]; head h reads kv
    head h // (H // KV); causal mask aligned bottom-right; window_size (left, right): query i
    sees keys in [i + sk - sq - left, i + sk - sq + right]; softcap: scores -> cap tanh(s / cap);
    all-masked rows give zeros."""
    sq, num_heads, head_dim = q.shape
    sk, num_kv_heads = k.shape[0], k.shape[1]
    assert num_heads % num_kv_heads == 0
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    kv_head = torch.arange(num_heads) // (num_heads // num_kv_heads)  # [H]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k[:, kv_head].float()) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if window_size[0] >= 0:
        left = torch.arange(sk)[None, :] >= torch.arange(sq)[:, None] + sk - sq - window_size[0]
        scores = scores.masked_fill(~left, float("-inf"))
    if causal:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq  # [sq, sk]
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    return torch.einsum("hqk,khd->qhd", probs, v[:, kv_head].float()).to(q.dtype)


def _paged(cache, table, length):
    """The first `length` positions of a sequence from a paged cache [num_blocks, page, KV, D]."""
    page = cache.shape[1]
    assert page % 256 == 0, "flash-attn 2 paged KV: page_block_size must be a multiple of 256"
    return cache[table[: math.ceil(length / page)].long()].flatten(0, 1)[:length]


def fake_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q: (total_q, nheads, headdim); k/v: (total_k, nheads_k, headdim), or with block_table
    (batch_size, max_num_blocks_per_seq) int32 the paged (num_blocks, page_block_size, nheads_k,
    headdim); cu_seqlens_q/k: (batch_size + 1,) int32. Returns (total_q, nheads, headdim)."""
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert dropout_p == 0.0 and window_size[1] in (-1, 0) and not return_attn_probs
    assert block_table is None or block_table.dtype == torch.int32
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
        if block_table is None:
            kb, vb = k[k0:k1], v[k0:k1]
        else:
            kb, vb = _paged(k, block_table[b], k1 - k0), _paged(v, block_table[b], k1 - k0)
        out[q0:q1] = _fake_attention(q[q0:q1], kb, vb, softmax_scale, causal, window_size, softcap)
    return out


def fake_flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q: (batch_size, seqlen, nheads, headdim); k_cache/v_cache paged (num_blocks,
    page_block_size, nheads_k, headdim) with block_table (batch_size, max_num_blocks_per_seq)
    int32; cache_seqlens: (batch_size,) int32. Returns (batch_size, seqlen, nheads, headdim)."""
    assert k is None and v is None and block_table is not None and not return_softmax_lse
    assert cache_seqlens.dtype == torch.int32 and block_table.dtype == torch.int32
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        kb, vb = _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length)
        out[b] = _fake_attention(q[b], kb, vb, softmax_scale, causal, window_size, softcap)
    return out


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flash_with_fake_kernels_matches_dense_reference(dtype, heads, case_name):
    query_lens, seq_lens = CASES[case_name]
    case = make_case(query_lens, seq_lens, *heads, 256, dtype)
    varlen, kvcache = Counting(fake_flash_attn_varlen_func), Counting(fake_flash_attn_with_kvcache)
    backend = FlashPagedAttention(block_size=256, varlen_fn=varlen, kvcache_fn=kvcache)
    assert_close(run(backend, case), case, dtype)
    decode = max(query_lens) == 1
    assert (kvcache.calls, varlen.calls) == ((1, 0) if decode else (0, 1))


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("window, softcap", [(3, None), (None, 0.5), (5, 1.0)])
def test_every_backend_honours_windows_and_soft_caps(case_name, window, softcap):
    """Against the torch reference: flash (fake kernels taking flash-attn's window_size and
    softcap) and SDPA (which sends such layers to the paged kernel)."""
    query_lens, seq_lens = CASES[case_name]
    case = make_case(query_lens, seq_lens, 4, 2, 256, torch.float32)
    reference = TorchReferenceAttention().forward(
        case.q, case.cache, case.meta, case.scale, window, softcap
    )
    plain = TorchReferenceAttention().forward(case.q, case.cache, case.meta, case.scale)
    fakes = {"varlen_fn": fake_flash_attn_varlen_func, "kvcache_fn": fake_flash_attn_with_kvcache}
    for backend in (FlashPagedAttention(block_size=256, **fakes), SdpaPagedAttention()):
        backend.prepare(case.meta)
        out = backend.forward(case.q, case.cache, case.meta, case.scale, window, softcap)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    if max(seq_lens) > (window or 0) or softcap:
        assert not torch.allclose(plain, reference, atol=1e-4)


def test_flash_rejects_block_sizes_flash_attn_cannot_page():
    fakes = {"varlen_fn": fake_flash_attn_varlen_func, "kvcache_fn": fake_flash_attn_with_kvcache}
    with pytest.raises(ValueError, match="multiple of 256"):
        FlashPagedAttention(block_size=16, **fakes)
    backend = FlashPagedAttention(**fakes)
    case = make_case([1], [5], 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        backend.prepare(case.meta)


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(_flash_attn_installed(), reason="flash_attn is installed")
def test_flash_without_flash_attn_says_so():
    with pytest.raises(ImportError, match="flash-attn"):
        FlashPagedAttention(block_size=256)
    with pytest.raises(ImportError, match="flash-attn"):
        get_backend("flash", torch.device("cpu"), block_size=256)


# ---- choosing a backend ----------------------------------------------------------------------


def test_get_backend_by_name():
    cpu = torch.device("cpu")
    assert isinstance(get_backend("auto", cpu), SdpaPagedAttention)
    assert get_backend("auto", "cpu", block_size=256).name == "sdpa"
    assert isinstance(get_backend("sdpa", cpu), SdpaPagedAttention)
    assert isinstance(get_backend("torch", cpu), TorchReferenceAttention)
    with pytest.raises(ValueError, match="unknown attention backend 'paged'"):
        get_backend("paged", cpu)


def test_auto_on_cuda_prefers_flash_then_triton_then_sdpa(monkeypatch):
    from shard import attention

    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    assert resolve_backend_name("auto", "cuda", block_size=256) == "flash"
    assert resolve_backend_name("auto", "cuda", block_size=None) == "flash"
    assert resolve_backend_name("auto", "cuda", block_size=16) == "triton"
    assert resolve_backend_name("auto", "cpu", block_size=256) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert resolve_backend_name("auto", "cuda", block_size=256) == "triton"
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert resolve_backend_name("auto", "cuda", block_size=16) == "sdpa"


def test_importing_the_flash_module_does_not_import_flash_attn():
    # flash_attn = None in sys.modules makes any `import flash_attn` raise ImportError.
    code = (
        "import sys; sys.modules['flash_attn'] = None\n"
        "import torch, shard.attention, shard.attention.flash_attn\n"
        "assert shard.attention.get_backend('auto', torch.device('cpu')).name == 'sdpa'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    only_import = (
        "import sys, shard.attention.flash_attn\n"
        "assert 'flash_attn' not in sys.modules, 'flash_attn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", only_import], check=True, cwd=REPO)
