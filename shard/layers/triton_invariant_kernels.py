"""The Triton kernels of batch-invariant mode on CUDA (see triton_invariant.py for what they
compute). Their own module, imported only when a CUDA step (or a test under TRITON_INTERPRET=1)
needs them: Triton decides at definition time whether a kernel is compiled or interpreted."""

import triton
import triton.language as tl


@triton.jit
def matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # in order, whole K in this program: no split-K
        in_k = k0 + k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + (k0 + k)[None, :],
            mask=(rows < M)[:, None] & in_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + (k0 + k)[None, :],
            mask=(cols < N)[:, None] & in_k[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [H]
    y_ptr,  # [T, H]
    H,
    eps,
    stride_x,
    stride_y,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    x = tl.load(x_ptr + row * stride_x + h, mask=h < H, other=0.0).to(tl.float32)
    inverse = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    normed = (x * inverse).to(y_ptr.dtype.element_ty).to(tl.float32)  # Llama: x.to(dtype)
    w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + h, (w * normed).to(y_ptr.dtype.element_ty), mask=h < H)
