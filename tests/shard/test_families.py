"""Every natively served family against transformers on the same tiny random checkpoint, in
float32: a batch of prompts prefilled, then decoded greedily through the paged cache; the same
prompts prefilled in chunks (the start of each already cached, as a prefix-cache hit leaves it);
with the reference attention, the default CPU path (batch-invariant) and the fast one. Logits
within 1e-4, greedy tokens equal."""

from __future__ import annotations

import random

import pytest
import torch

from shard.attention import get_backend
from shard.engine.forward_context import AttentionMetadata, ForwardContext
from shard.engine.kv_cache import KVCache
from shard.models import load_model
from tests.shard.families import FAMILIES, load_reference, save_family

BLOCK = 4
BLOCKS = 96


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = save_family(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_model(path, torch.float32), load_reference(path)


class Sequence:
    def __init__(self, tokens: list[int], blocks: list[int]):
        self.tokens, self.blocks, self.cache_len = tokens, blocks, 0

    def slots(self, n: int) -> list[int]:
        positions = range(self.cache_len, self.cache_len + n)
        return [self.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def step(model, cache, backend, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
    """Computes counts[i] new tokens of seqs[i]; -> logits [sum(counts), V]."""
    ids = [t for s, n in zip(seqs, counts) for t in s.tokens[s.cache_len : s.cache_len + n]]
    positions = [p for s, n in zip(seqs, counts) for p in range(s.cache_len, s.cache_len + n)]
    slots = [slot for s, n in zip(seqs, counts) for slot in s.slots(n)]
    meta = AttentionMetadata.build(
        counts, [s.cache_len + n for s, n in zip(seqs, counts)], [s.blocks for s in seqs],
        slots, BLOCK,
    )  # fmt: skip
    backend.prepare(meta)
    with torch.inference_mode():
        hidden = model(
            torch.tensor(ids), torch.tensor(positions), ForwardContext(meta, cache, backend)
        )
        logits = model.compute_logits(hidden)
    for s, n in zip(seqs, counts):
        s.cache_len += n
    return logits


def reference_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0].float()


def new_cache(model) -> KVCache:
    layers = model.config.num_layers
    return KVCache(layers, BLOCKS, BLOCK, model.num_kv_heads, model.head_dim, torch.float32)


def sequences(rng: random.Random, lengths: list[int]) -> list[Sequence]:
    free = list(range(1, BLOCKS))
    rng.shuffle(free)
    return [
        Sequence([rng.randrange(3, 128) for _ in range(n)], [free.pop() for _ in range(16)])
        for n in lengths
    ]


BACKENDS = ["torch", "sdpa-invariant", "sdpa-fast"]


def backend_named(name: str, request):
    if name == "sdpa-fast":
        request.getfixturevalue("fast_numerics")  # batch invariance off
    return get_backend("torch" if name == "torch" else "sdpa", "cpu")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_prefill_then_greedy_decode_matches_transformers(family, backend_name, request):
    name, model, hf = family
    backend = backend_named(backend_name, request)
    rng = random.Random(0)
    seqs = sequences(rng, [5, 11, 17, 9])  # 4 prompts; windows of 8 are passed while decoding
    cache = new_cache(model)
    logits = step(model, cache, backend, seqs, [len(s.tokens) for s in seqs])
    ends = torch.tensor([len(s.tokens) for s in seqs]).cumsum(0) - 1
    last = logits[ends]
    for _ in range(32):  # greedy, all four sequences in each decode step
        for s, row in zip(seqs, last):
            s.tokens.append(int(row.argmax()))
        last = step(model, cache, backend, seqs, [1] * len(seqs))
    for s, row in zip(seqs, last):
        expected = reference_logits(hf, s.tokens)
        assert reference_logits(hf, s.tokens[:-1]).argmax(-1)[-32:].tolist() == s.tokens[-32:], name
        torch.testing.assert_close(row, expected[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_chunked_prefill_over_a_cached_prefix_matches_transformers(family, backend_name, request):
    name, model, hf = family
    backend = backend_named(backend_name, request)
    rng = random.Random(1)
    seqs = sequences(rng, [30, 21, 26, 13])
    cache = new_cache(model)
    step(model, cache, backend, seqs, [8, 4, 12, 4])  # the "cached" prefixes
    while any(s.cache_len < len(s.tokens) for s in seqs):
        active = [s for s in seqs if s.cache_len < len(s.tokens)]
        counts = [min(rng.randint(1, 9), len(s.tokens) - s.cache_len) for s in active]
        logits = step(model, cache, backend, active, counts)
        row = 0
        for s, n in zip(active, counts):
            expected = reference_logits(hf, s.tokens[: s.cache_len])[-n:]
            torch.testing.assert_close(logits[row : row + n], expected, atol=1e-4, rtol=0)
            row += n
