"""The Triton paged decode kernel (see triton_decode.py for what it computes). Its own module,
imported only when a CUDA decode step (or a test under TRITON_INTERPRET=1) needs it: Triton
decides at definition time whether a kernel is compiled or interpreted."""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, BLOCK_SIZE, KV, D]
    v_ptr,
    out_ptr,  # [B, H, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32: exact against the reference)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    s = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q_offsets = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)  # [GROUP_PAD, DIM_PAD]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for page in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + page).to(tl.int64)
        in_seq = page * BLOCK_SIZE + s < seq_len  # [BLOCK_SIZE]
        kv_offsets = block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh
        kv_mask = in_seq[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_offsets + d[None, :], mask=kv_mask, other=0.0)  # [S, DP]
        v = tl.load(v_ptr + kv_offsets + d[None, :], mask=kv_mask, other=0.0)
        scores = (
            tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        )  # [GROUP_PAD, S]
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(
            tl.float32
        )
        m = m_new
    out = acc / total[:, None]
    out_offsets = seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
