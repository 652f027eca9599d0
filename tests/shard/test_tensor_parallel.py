"""Megatron-style tensor parallelism on the CPU with gloo: a tiny model split over 2 and 3
ranks computes the same logits as on one (float32, 1e-5), with KV heads split or replicated,
and, for its world size, a sequence's logits are the same bits alone as beside others (the
all-reduce adds the ranks' parts in rank order)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from shard.distributed import check_divisible
from shard.models import load_model
from tests.conftest import save_tiny_model
from tests.shard.families import TENSOR_PARALLEL, save_family
from tests.shard.tp_worker import families_worker, run_steps, worker

PROMPTS = [[5, 17, 23, 42, 7, 9, 11], [3, 99, 4], [8, 8, 15, 16, 23, 42, 101, 2, 6, 77, 31]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size, kv_heads", [(2, 6), (3, 6), (3, 3), (2, 1), (3, 1)])
def test_split_model_matches_one_rank(tmp_path, world_size, kv_heads):
    path = save_tiny_model(
        tmp_path / "m",
        seed=5,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        intermediate_size=132,
        vocab_size=120,
        tie_word_embeddings=kv_heads == 1,
    )
    expected = run_steps(load_model(path, torch.float32), PROMPTS)
    out = tmp_path / "logits"
    mp.start_processes(
        worker,
        args=(world_size, free_port(), str(path), PROMPTS, str(out)),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
    first, total = len(PROMPTS[0]), sum(len(p) for p in PROMPTS)
    rows = [*range(first), total, total + len(PROMPTS)]  # the first prompt's rows of 3 steps
    for rank in range(world_size):
        logits = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        # batch invariance holds for a given world size: the first prompt alone, same bits
        assert torch.equal(torch.load(f"{out}.{rank}.alone"), logits[rows])


def test_each_rank_loads_only_its_slice(tmp_path):
    from shard.distributed import Dist

    path = save_tiny_model(
        tmp_path / "m",
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=132,
        vocab_size=120,
    )
    full = sum(p.numel() for p in load_model(path, torch.float32).parameters())
    # A rank's slice, loaded with a fake group (no collective runs while loading).
    part = sum(p.numel() for p in load_model(path, torch.float32, dist=Dist(0, 3)).parameters())
    assert part < 0.5 * full


def test_a_model_that_cannot_be_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"over 2 shards: num_attention_heads \(9\).*num_key"):
        check_divisible(9, 3, 1536, 2)
    check_divisible(9, 3, 1536, 3)  # SmolLM2-135M splits over 3
    check_divisible(9, 3, 1536, 1)


def test_every_native_family_split_over_two_ranks_matches_one(tmp_path):
    """Heads, KV heads, MLPs and experts split; sliding windows, soft-caps, q/k norms and the
    rotary variants on each rank's heads."""
    names = TENSOR_PARALLEL
    paths = [str(save_family(name, tmp_path / name, vocab_size=128)) for name in names]
    prompts = [[p % 128 for p in prompt] for prompt in PROMPTS]
    expected = [run_steps(load_model(path, torch.float32), prompts) for path in paths]
    out = tmp_path / "logits"
    mp.start_processes(
        families_worker,
        args=(2, free_port(), paths, prompts, str(out)),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    for i, name in enumerate(names):
        for rank in range(2):
            logits = torch.load(f"{out}.{i}.{rank}")
            torch.testing.assert_close(logits, expected[i], atol=1e-4, rtol=0, msg=name)


def test_a_family_that_cannot_split_says_so(tmp_path):
    from shard.distributed import Dist
    from shard.models.errors import UnsupportedModel

    path = save_family("olmo2", tmp_path / "olmo2")
    with pytest.raises(UnsupportedModel, match="Olmo2ForCausalLM cannot be split.*--num-shard 1"):
        load_model(path, torch.float32, dist=Dist(0, 2))
