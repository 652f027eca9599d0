"""The shard's Llama against transformers' LlamaForCausalLM on the same random weights:
prefill, decode through the paged cache, a cached prefix (cache_len > 0) and chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from shard.attention.torch_ref import TorchReferenceAttention
from shard.engine.forward_context import AttentionMetadata, ForwardContext
from shard.engine.kv_cache import KVCache
from shard.models import load_model
from tests.conftest import save_tiny_model

BLOCK_SIZE = 4
NUM_BLOCKS = 64


class PagedSequence:
    """One sequence driven by hand through the paged cache, with scattered blocks."""

    def __init__(self, token_ids: list[int], blocks: list[int]):
        self.token_ids = token_ids
        self.blocks = blocks
        self.cache_len = 0

    def slots(self, start: int, end: int) -> list[int]:
        return [
            self.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)
        ]


def run_step(model, cache, seqs: list[PagedSequence], counts: list[int]) -> torch.Tensor:
    """Computes `counts[i]` new tokens of each sequence; returns logits of every new token."""
    ids, positions, slots = [], [], []
    for seq, n in zip(seqs, counts):
        start = seq.cache_len
        ids += seq.token_ids[start : start + n]
        positions += list(range(start, start + n))
        slots += seq.slots(start, start + n)
    meta = AttentionMetadata.build(
        counts,
        [s.cache_len + n for s, n in zip(seqs, counts)],
        [s.blocks for s in seqs],
        slots,
        BLOCK_SIZE,
    )
    ctx = ForwardContext(meta, cache, TorchReferenceAttention())
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.tensor(positions), ctx)
        logits = model.compute_logits(hidden)
    for seq, n in zip(seqs, counts):
        seq.cache_len += n
    return logits


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()  # [L, V]


@pytest.fixture(scope="module")
def ours(tiny_llama_dir):
    return load_model(tiny_llama_dir, torch.float32)


def new_cache(model) -> KVCache:
    c = model.config
    return KVCache(c.num_layers, NUM_BLOCKS, BLOCK_SIZE, c.num_kv_heads, c.head_dim, torch.float32)


def random_sequences(n: int, rng: random.Random) -> list[PagedSequence]:
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    seqs = []
    for _ in range(n):
        length = rng.randint(3, 30)
        seqs.append(
            PagedSequence(
                [rng.randrange(128) for _ in range(length)], [free.pop() for _ in range(8)]
            )
        )
    return seqs


def test_prefill_then_decode_matches_transformers(ours, tiny_llama_hf):
    rng = random.Random(0)
    seqs = random_sequences(4, rng)
    prompt_lens = [len(s.token_ids) - 2 for s in seqs]
    cache = new_cache(ours)
    logits = run_step(ours, cache, seqs, prompt_lens)
    offsets = [0]
    for n in prompt_lens:
        offsets.append(offsets[-1] + n)
    for i, seq in enumerate(seqs):
        expected = hf_logits(tiny_llama_hf, seq.token_ids[: prompt_lens[i]])
        torch.testing.assert_close(logits[offsets[i] : offsets[i + 1]], expected, atol=1e-4, rtol=0)
    for _ in range(2):  # two decode steps through the paged cache, all sequences together
        logits = run_step(ours, cache, seqs, [1] * len(seqs))
        for i, seq in enumerate(seqs):
            expected = hf_logits(tiny_llama_hf, seq.token_ids[: seq.cache_len])[-1]
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0)


def test_cached_prefix_and_chunked_prefill(ours, tiny_llama_hf):
    rng = random.Random(1)
    seqs = random_sequences(3, rng)
    cache = new_cache(ours)
    # The first 2 tokens of every sequence are "already in the cache" (written by an earlier step).
    run_step(ours, cache, seqs, [2, 2, 2])
    # Then the rest in uneven chunks, mixed with single-token steps of other sequences.
    while any(s.cache_len < len(s.token_ids) for s in seqs):
        counts = [min(rng.randint(1, 7), len(s.token_ids) - s.cache_len) for s in seqs]
        active = [(s, n) for s, n in zip(seqs, counts) if n > 0]
        logits = run_step(ours, cache, [s for s, _ in active], [n for _, n in active])
        row = 0
        for seq, n in active:
            expected = hf_logits(tiny_llama_hf, seq.token_ids[: seq.cache_len])[-n:]
            torch.testing.assert_close(logits[row : row + n], expected, atol=1e-4, rtol=0)
            row += n


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, initializer_range=0.3),
        # 40 positions > 16 trained ones: the NTK base grows with the sequence
        dict(
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
            max_position_embeddings=16,
            initializer_range=0.3,
        ),
        dict(tie_word_embeddings=True, num_key_value_heads=1),
        dict(attention_bias=True),
    ],
)
def test_config_variants_match_transformers(tmp_path, overrides):
    import transformers

    path = save_tiny_model(tmp_path / "m", seed=3, **overrides)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, torch.float32)
    rng = random.Random(2)  # one generator: 40 different tokens, so positions matter
    seq = PagedSequence([rng.randrange(128) for _ in range(40)], list(range(1, 12)))
    logits = run_step(model, new_cache(model), [seq], [40])
    torch.testing.assert_close(logits, hf_logits(hf, seq.token_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_rope_scaling_override_equals_the_config_saying_it(tmp_path, rope_type):
    """launcher --rope-scaling/--rope-factor: the model behaves as if config.json said so."""
    import transformers

    scaling = {"rope_type": rope_type, "factor": 3.0}
    # Weights large enough that attention is not uniform, so the rotation matters.
    sizes = dict(max_position_embeddings=16, initializer_range=0.3)
    plain = save_tiny_model(tmp_path / "plain", seed=4, **sizes)
    scaled = save_tiny_model(tmp_path / "scaled", seed=4, rope_scaling=scaling, **sizes)
    hf = transformers.LlamaForCausalLM.from_pretrained(scaled, dtype=torch.float32).eval()
    model = load_model(plain, torch.float32, rope_scaling=scaling)
    rng = random.Random(5)
    seq = PagedSequence([rng.randrange(128) for _ in range(40)], list(range(1, 12)))
    logits = run_step(model, new_cache(model), [seq], [40])
    torch.testing.assert_close(logits, hf_logits(hf, seq.token_ids), atol=1e-4, rtol=0)
    unscaled = load_model(plain, torch.float32)
    seq.cache_len = 0
    other = run_step(unscaled, new_cache(unscaled), [seq], [40])
    assert not torch.allclose(other, logits, atol=1e-3)
