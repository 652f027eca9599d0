"""The GGML block kernels (shard/quant/ggml_kernels.c) against gguf-py's dequantizer, for every
type they read, on every instruction set this CPU runs; and their batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from shard.config import default_cache_dir
from shard.native import build_library
from shard.quant.ggml import BLOCK_TYPES, BlockMatrix, dequantize_blocks
from shard.quant.kernels import BLOCK_SOURCE, INCLUDES, SOURCE, NativeKernels, get_kernels
from tests.conftest import OLDER_MARCHES, skip_unless_runnable

# Where each type keeps its float16 factors (d, dmin or m) in a block: random bytes are a
# valid block everywhere else.
HALF_FIELDS = {
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
TYPES = sorted(BLOCK_TYPES, key=lambda t: t.value)


def random_blocks(ggml_type: GGMLQuantizationType, n: int, k: int, seed: int = 0) -> BlockMatrix:
    """Every bit pattern of the block's integers, with finite, small float16 factors."""
    weights, nbytes = GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // weights, nbytes), dtype=np.uint8)
    for at in HALF_FIELDS[ggml_type.name]:
        halves = rng.uniform(-0.02, 0.02, size=(n, k // weights)).astype(np.float16)
        raw[..., at : at + 2] = halves.view(np.uint8).reshape(n, k // weights, 2)
    return BlockMatrix(ggml_type, torch.from_numpy(raw.reshape(n, -1)), k)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def int8_rounded(x: torch.Tensor, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    """x as the kernels see it: each chunk of 256 in the type's block order (Q4_K and Q5_K
    hold blocks 0 2 1 3 4 6 5 7), int8 groups of 64 there, dx = max|x| / 127, halves away
    from zero; returned in x's own order."""
    rows, k = x.shape
    padded = -(-k // 256) * 256
    order = [0, 2, 1, 3, 4, 6, 5, 7] if ggml_type.name in ("Q4_K", "Q5_K") else list(range(8))
    blocks = torch.nn.functional.pad(x.float(), (0, padded - k)).view(rows, -1, 8, 32)
    groups = blocks[:, :, order].reshape(rows, -1, 64)
    dx = groups.abs().amax(-1, keepdim=True) / 127
    scaled = groups * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    q = torch.trunc(scaled + torch.copysign(torch.full_like(scaled, 0.5), scaled))
    arranged = (q * dx).view(rows, -1, 8, 32)
    restored = torch.empty_like(arranged)
    restored[:, :, order] = arranged
    return restored.reshape(rows, padded)[:, :k]


def shapes(ggml_type: GGMLQuantizationType) -> list[int]:
    """K values: whole chunks of 256, and for the blocks of 32 partial last chunks."""
    if GGML_QUANT_SIZES[ggml_type][0] == 256:
        return [256, 768]
    return [32, 96, 576]


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_embedding_rows_equal_the_reference(ggml_type):
    kernels = get_kernels()
    for k in shapes(ggml_type):
        w = random_blocks(ggml_type, 12, k)
        ids = torch.tensor([3, 0, 11, 3])
        got = kernels.embedding(ids, w, torch.float32)
        torch.testing.assert_close(got, dequantize_blocks(w)[ids], rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_products_match_the_dense_reference(ggml_type):
    """Exactly the product with x rounded to int8 as the kernels round it (float32 sums aside),
    and within that rounding of the product with x itself."""
    kernels = get_kernels()
    torch.manual_seed(0)
    for k in shapes(ggml_type):
        w = random_blocks(ggml_type, 37, k)  # 37: a partial tile of 4 rows
        dense = dequantize_blocks(w).double()
        for rows in (1, 3, 70):  # 70: more than one tile of 64 rows of x
            x = torch.randn(rows, k)
            got = kernels.matmul(x, w).double()
            assert relative_error(got, int8_rounded(x, ggml_type).double() @ dense.T) < 1e-5
            assert relative_error(got, x.double() @ dense.T) < 0.02
        x = torch.randn(5, k).bfloat16()
        got = kernels.matmul(x, w)
        assert got.dtype == torch.bfloat16
        assert relative_error(got.double(), int8_rounded(x, ggml_type).double() @ dense.T) < 0.01


@pytest.mark.parametrize("march", sorted(OLDER_MARCHES))
def test_older_instruction_sets_match_the_reference(march):
    skip_unless_runnable(march)
    cache = default_cache_dir() / "kernels"
    kernels = NativeKernels(
        build_library(cache, SOURCE, INCLUDES, march),
        build_library(cache, BLOCK_SOURCE, INCLUDES, march),
    )
    torch.manual_seed(0)
    for ggml_type in TYPES:
        k = shapes(ggml_type)[-1]
        w = random_blocks(ggml_type, 9, k)
        x = torch.randn(3, k)
        expected = int8_rounded(x, ggml_type).double() @ dequantize_blocks(w).double().T
        assert relative_error(kernels.matmul(x, w).double(), expected) < 1e-5


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_a_rows_output_does_not_depend_on_the_other_rows(ggml_type):
    """Batch invariance: row i of x @ W is the same bits alone, in any batch, at any position."""
    kernels = get_kernels()
    k = shapes(ggml_type)[-1]
    w = random_blocks(ggml_type, 21, k)
    torch.manual_seed(1)
    x = torch.randn(130, k)
    full = kernels.matmul(x, w)
    for rows in ([7], [0, 7], list(range(65, 75)), [129, 7, 3]):
        assert torch.equal(kernels.matmul(x[rows], w), full[rows])


def test_rows_columns_and_fusing_keep_the_blocks():
    w = random_blocks(GGMLQuantizationType.Q4_K, 8, 512)
    dense = dequantize_blocks(w)
    assert torch.equal(dequantize_blocks(w.rows(2, 5)), dense[2:5])
    assert torch.equal(dequantize_blocks(w.columns(256, 512)), dense[:, 256:])
    fused = BlockMatrix.cat_rows([w.rows(0, 3), w.rows(3, 8)])
    assert torch.equal(fused.blocks, w.blocks)
    with pytest.raises(ValueError, match="blocks of 256"):
        w.columns(0, 128)
    other = random_blocks(GGMLQuantizationType.Q6_K, 2, 512)
    with pytest.raises(ValueError, match="different GGML types"):
        BlockMatrix.cat_rows([w, other])


def test_the_tensor_index_is_gguf_pys(smollm2_dir):
    """The header reader finds every tensor where gguf-py's reader does."""
    from gguf import GGUFReader

    from shard.checkpoint.gguf_weights import read_tensor_index

    path = (smollm2_dir / "model.gguf").resolve()
    ours = read_tensor_index(path)
    theirs = GGUFReader(path).tensors
    assert len(ours) == len(theirs)
    for t in theirs:
        entry = ours[t.name]
        assert (entry.tensor_type, entry.data_offset, entry.n_bytes) == (
            t.tensor_type,
            t.data_offset,
            t.n_bytes,
        )
        assert entry.shape == tuple(int(d) for d in t.shape)
