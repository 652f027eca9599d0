"""Batch invariance (shard/numerics.py): the same bits for a row, a token or a request whatever
else its step holds. Kernel by kernel (row r alone and among 2..64 rows, on every instruction
set this CPU can run), then whole models: a sequence's logits alone, and prefilled in chunks
beside other sequences, with its prefix computed by another request, decoded in batches of
every size."""

from __future__ import annotations

import ctypes
import random

import pytest
import torch

from shard.attention.paged_decode import SOURCE as ATTENTION_SOURCE
from shard.attention.paged_decode import PagedDecodeKernel
from shard.attention.sdpa import SdpaPagedAttention
from shard.checkpoint.convert import default_cache_dir
from shard.engine.forward_context import AttentionMetadata, ForwardContext
from shard.engine.kv_cache import KVCache, LayerKV
from shard.layers.dense import SOURCE as DENSE_SOURCE
from shard.layers.dense import DenseKernel
from shard.layers.fused import fused_ops
from shard.models import load_model
from shard.native import SIMD_HEADER, build_library
from shard.quant.kernels import BLOCK_SOURCE, INCLUDES, SOURCE, NativeKernels
from shard.quant.weight import quantize
from tests.conftest import OLDER_MARCHES, skip_unless_runnable

MARCHES = ["native", *sorted(OLDER_MARCHES)]
ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64]


def build(source, includes, march: str):
    """The library of `source` for `march` (its path), skipped where this CPU cannot run it."""
    if march != "native":
        skip_unless_runnable(march)
    return build_library(default_cache_dir() / "kernels", source, includes, march)


def assert_rows_invariant(product, x: torch.Tensor) -> None:
    """product(x[:n]) row by row equals product(x) for every n, and each row alone."""
    full = product(x)
    for n in ROW_COUNTS:
        assert torch.equal(product(x[:n]), full[:n]), f"the first {n} rows differ"
    for r in (0, 5, len(x) - 1):
        assert torch.equal(product(x[r : r + 1])[0], full[r]), f"row {r} alone differs"


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize(
    "kind,group,k", [("q4", 32, 160), ("q4", 32, 576), ("q4", 64, 192), ("q8", 32, 224),
                     ("q8", 32, 576), ("q8", 192, 192)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_products_give_a_row_the_same_bits_in_any_batch(march, kind, group, k, dtype):
    kernels = NativeKernels(build(SOURCE, INCLUDES, march), build(BLOCK_SOURCE, INCLUDES, march))
    torch.manual_seed(0)
    weight = quantize(torch.randn(83, k), kind, group)  # 83: threads' shares not multiples of 4
    x = torch.randn(64, k).to(dtype)
    assert_rows_invariant(lambda rows: kernels.matmul(rows, weight), x)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("k", [64, 100, 576])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_products_give_a_row_the_same_bits_in_any_batch(march, k, w_dtype, x_dtype):
    kernel = DenseKernel(ctypes.CDLL(str(build(DENSE_SOURCE, (SIMD_HEADER,), march))))
    torch.manual_seed(1)
    weight, x = torch.randn(83, k).to(w_dtype), torch.randn(64, k).to(x_dtype)
    got = kernel.matmul(x, weight)
    expected = torch.nn.functional.linear(x.float(), weight.float())
    tol = 1e-5 if x_dtype is torch.float32 else 1e-2  # bfloat16: the output's own rounding
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * k**0.5)
    assert_rows_invariant(lambda rows: kernel.matmul(rows, weight), x)


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activations_give_a_row_the_same_bits_in_any_batch(gelu):
    """SiLU (Llama's MLP) and GELU's tanh approximation (Gemma's) times up."""
    ops = fused_ops()
    x = torch.randn(64, 2 * 100) * 4
    gate, up = x[:, :100], x[:, 100:]
    if gelu:
        reference = torch.nn.functional.gelu(gate, approximate="tanh") * up
    else:
        reference = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(ops.gated_mul(x, gelu), reference, rtol=1e-6, atol=1e-5)
    assert_rows_invariant(lambda rows: ops.gated_mul(rows, gelu), x)


class Attention:
    """A layer's cache holding sequences of random K/V in scattered blocks of 4."""

    def __init__(self, lengths: list[int], dtype: torch.dtype, heads=4, kv_heads=2, dim=16):
        gen = torch.Generator().manual_seed(len(lengths))
        self.blocks = [[] for _ in lengths]
        ids = (torch.randperm(sum(-(-n // 4) for n in lengths) + 1, generator=gen) + 1).tolist()
        for i, n in enumerate(lengths):
            self.blocks[i] = [ids.pop() for _ in range(-(-n // 4))]
        shape = (max(max(b) for b in self.blocks) + 1, 4, kv_heads, dim)
        self.cache = LayerKV(
            torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
        )
        self.q = torch.randn(64, heads, dim, generator=gen).to(dtype)  # rows handed out in order

    def step(self, kernel, seqs: list[int], query_lens: list[int], seq_lens: list[int]):
        """Attention of the last query_lens[i] positions of seq_lens[i] of sequence seqs[i]."""
        meta = AttentionMetadata.build(
            query_lens, seq_lens, [self.blocks[s] for s in seqs], [0] * sum(query_lens), 4
        )
        return kernel.forward(self.q[: sum(query_lens)], self.cache, meta, 0.25)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_prompt_token_attends_as_a_decode_token_at_its_position(march, dtype):
    """The paged kernel computes each token on its own: a prompt chunk's token i is, bit for
    bit, the decode step of the same query at the same position, alone or among others."""
    kernel = PagedDecodeKernel(ctypes.CDLL(str(build(ATTENTION_SOURCE, (SIMD_HEADER,), march))))
    layer = Attention([37, 21, 50], dtype)
    queries = layer.q[:12].clone()
    chunk = layer.step(kernel, [0], [12], [37])  # positions 25..36 of sequence 0, one chunk
    for i in range(12):
        layer.q[0] = queries[i]
        alone = layer.step(kernel, [0], [1], [26 + i])  # the decode step at position 25 + i
        assert torch.equal(alone[0], chunk[i]), f"prompt token {i} alone"
        layer.q[1] = queries[i]
        mixed = layer.step(kernel, [1, 0, 2], [1, 1, 1], [21, 26 + i, 50])
        assert torch.equal(mixed[1], chunk[i]), f"prompt token {i} among other decodes"


# ---- whole models ------------------------------------------------------------------------

BLOCK = 4
CACHE_BLOCKS = 400


class Sequence:
    def __init__(self, token_ids: list[int], blocks: list[int], cache_len: int = 0):
        self.token_ids, self.blocks, self.cache_len = token_ids, blocks, cache_len

    def slots(self, start: int, end: int) -> list[int]:
        return [self.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]


class Engine:
    """Steps sequences through a model as the generator does (the CPU's default backend, its
    compiled decoder where the model has one), greedy, one new block list per sequence."""

    def __init__(self, model, dtype: torch.dtype, seed: int):
        c = model.config
        self.model, self.rng = model, random.Random(seed)
        self.cache = KVCache(c.num_layers, CACHE_BLOCKS, BLOCK, c.num_kv_heads, c.head_dim, dtype)
        self.free = list(range(1, CACHE_BLOCKS))
        self.rng.shuffle(self.free)

    def new(self, token_ids: list[int], length: int, shared: Sequence | None = None, n=0):
        """A sequence of up to `length` tokens; with `shared`, its first n blocks are shared's
        (a prefix-cache hit: those positions are not computed again)."""
        blocks = shared.blocks[:n] if shared else []
        blocks += [self.free.pop() for _ in range(-(-length // BLOCK) - len(blocks))]
        return Sequence(list(token_ids), blocks, cache_len=n * BLOCK)

    def step(self, work: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """One forward: `count` tokens of each sequence; returns each one's last logits row,
        and appends its greedy token where its prompt is done."""
        ids, positions, slots = [], [], []
        for seq, n in work:
            ids += seq.token_ids[seq.cache_len : seq.cache_len + n]
            positions += range(seq.cache_len, seq.cache_len + n)
            slots += seq.slots(seq.cache_len, seq.cache_len + n)
        meta = AttentionMetadata.build(
            [n for _, n in work], [s.cache_len + n for s, n in work],
            [s.blocks for s, _ in work], slots, BLOCK,
        )  # fmt: skip
        backend = SdpaPagedAttention()
        backend.prepare(meta)
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(ids),
                torch.tensor(positions),
                ForwardContext(meta, self.cache, backend),
            )
            ends = torch.tensor(list(accumulate(n for _, n in work))) - 1
            logits = self.model.compute_logits(hidden[ends])
        for (seq, n), row in zip(work, logits):
            seq.cache_len += n
            if seq.cache_len == len(seq.token_ids):
                seq.token_ids.append(int(row.argmax()))
        return list(logits)


def accumulate(values):
    total = 0
    for v in values:
        total += v
        yield total


PROMPT_LEN, NEW_TOKENS = 41, 6


def solo(model, dtype, prompt: list[int]) -> list[torch.Tensor]:
    engine = Engine(model, dtype, seed=0)
    seq = engine.new(prompt, PROMPT_LEN + NEW_TOKENS)
    out = engine.step([(seq, PROMPT_LEN)])
    for _ in range(NEW_TOKENS - 1):
        out += engine.step([(seq, 1)])
    return out


def crowded(model, dtype, prompt: list[int], seed: int) -> list[torch.Tensor]:
    """The same request among others: its prefix (whole blocks) written by an earlier request,
    the rest prefilled in random chunks beside other sequences' chunks and decodes, then
    decoded beside 0 to 40 others."""
    engine = Engine(model, dtype, seed)
    rng, vocab = engine.rng, model.config.vocab_size
    earlier = engine.new(prompt[:24] + [rng.randrange(vocab) for _ in range(9)], 40)
    engine.step([(earlier, len(earlier.token_ids))])
    cached_blocks = rng.choice([0, 2, 6])  # 0, 8 or 24 prompt tokens from the "prefix cache"
    target = engine.new(prompt, PROMPT_LEN + NEW_TOKENS, shared=earlier, n=cached_blocks)
    others = []
    out: list[torch.Tensor] = []
    while len(out) < NEW_TOKENS:
        while len(others) < rng.randint(0, 40):
            n = rng.randint(1, 30)
            others.append(engine.new([rng.randrange(vocab) for _ in range(n)], n + 8))
        others = [s for s in others if len(s.token_ids) < len(s.blocks) * BLOCK - 1]
        rng.shuffle(others)
        work = [(s, rng.randint(1, len(s.token_ids) - s.cache_len)) for s in others]
        left = len(target.token_ids) - target.cache_len
        mine = rng.randint(1, left) if target.cache_len < PROMPT_LEN else 1
        work.insert(rng.randrange(len(work) + 1), (target, mine))
        known = len(target.token_ids)
        logits = engine.step(work)
        if len(target.token_ids) > known:  # its step ended with a new token
            out.append(logits[[s for s, _ in work].index(target)])
    return out


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    f32, bf16 = torch.float32, torch.bfloat16
    return {
        "float32 dense": (load_model(tiny_llama_dir, f32), f32),
        "bfloat16 dense": (load_model(tiny_llama_dir, bf16), bf16),
        "float32 int4": (load_model(tiny_llama_dir, f32, quantize="int4"), f32),
        "bfloat16 int4": (load_model(tiny_llama_dir, bf16, quantize="int4"), bf16),
        "float32 int8": (load_model(tiny_llama_dir, f32, quantize="eetq"), f32),
    }


@pytest.mark.parametrize(
    "name", ["float32 dense", "bfloat16 dense", "float32 int4", "bfloat16 int4", "float32 int8"]
)
def test_a_request_gets_the_same_logits_in_any_batch_cache_and_chunking(models, name):
    model, dtype = models[name]
    if "int" in name:
        assert model.decoder is not None  # quantized: the compiled decoder runs every step
    prompt = [random.Random(7).randrange(model.config.vocab_size) for _ in range(PROMPT_LEN)]
    expected = solo(model, dtype, prompt)
    for seed in range(4):
        got = crowded(model, dtype, prompt, seed)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"seed {seed}: logits of new token {i} differ"
