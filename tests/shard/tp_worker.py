"""Runs one tensor-parallel rank of a tiny model for tests/shard/test_tensor_parallel.py
(a module of its own so torch.multiprocessing can start it in a fresh process)."""

from __future__ import annotations

import os

import torch

from shard.attention.torch_ref import TorchReferenceAttention
from shard.distributed import init_distributed
from shard.engine.forward_context import AttentionMetadata, ForwardContext
from shard.engine.kv_cache import KVCache
from shard.models import load_model

BLOCK_SIZE = 4


def run_steps(model, prompts: list[list[int]]) -> torch.Tensor:
    """Prefill every prompt in one step, then two decode steps; logits of every step stacked."""
    cache = KVCache(
        model.config.num_layers, 64, BLOCK_SIZE, model.num_kv_heads, model.head_dim, torch.float32
    )
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    lens = [0] * len(prompts)
    outputs = []
    for counts in ([len(p) for p in prompts], [1] * len(prompts), [1] * len(prompts)):
        ids, pos, slots = [], [], []
        for i, n in enumerate(counts):
            ids += seqs[i][lens[i] : lens[i] + n]
            pos += range(lens[i], lens[i] + n)
            slots += [
                tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                for p in range(lens[i], lens[i] + n)
            ]
        meta = AttentionMetadata.build(
            counts, [lens[i] + n for i, n in enumerate(counts)], tables, slots, BLOCK_SIZE
        )
        with torch.inference_mode():
            hidden = model(
                torch.tensor(ids),
                torch.tensor(pos),
                ForwardContext(meta, cache, TorchReferenceAttention()),
            )
            logits = model.compute_logits(hidden)
        outputs.append(logits)
        for i, n in enumerate(counts):
            lens[i] += n
            seqs[i].append(int(logits[sum(counts[: i + 1]) - 1].argmax()))
    return torch.cat(outputs)


def leave() -> None:
    """Ends the rank once every rank has saved its results. The process exits without running
    gloo's destructors: tearing the group down while a peer exits at the same moment now and then
    aborts a rank ("terminate called without an active exception") on a loaded machine."""
    torch.distributed.barrier()
    os._exit(0)


def worker(rank: int, world_size: int, port: int, model_dir: str, prompts, out_path: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, torch.device("cpu"), 60)
    model = load_model(model_dir, torch.float32, "cpu", dist)
    logits = run_steps(model, prompts)
    torch.save(logits, f"{out_path}.{rank}")
    torch.save(run_steps(model, prompts[:1]), f"{out_path}.{rank}.alone")  # batch invariance
    leave()


def families_worker(rank: int, world_size: int, port: int, paths: list[str], prompts, out: str):
    """Every family's tiny model split over world_size ranks, in one process group."""
    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, torch.device("cpu"), 60)
    for i, path in enumerate(paths):
        torch.save(
            run_steps(load_model(path, torch.float32, "cpu", dist), prompts), f"{out}.{i}.{rank}"
        )
    leave()
