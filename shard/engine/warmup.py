"""Warmup: run the largest prefill the router will ever send (profiling peak memory), then
size the paged KV cache from the memory budget. Reports how many tokens the cache holds."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shard.config import MemoryBudget
from shard.engine.batch import Batch, RequestState
from shard.engine.generator import Generator
from shard.sampling.sampler import RequestSampler, SamplingParams

log = logging.getLogger(__name__)


DEFAULT_KV_TOKENS = 16384  # the CPU's KV cache without token limits (1 GiB for Llama 3.2 1B)
PROFILE_TOKENS = 16  # the CPU's warmup prefill where the cache is sized by tokens


@dataclass(frozen=True)
class WarmupResult:
    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int


def free_memory_bytes(device: torch.device, cuda_fraction: float = 1.0) -> int:
    """Memory this process may still use: on a GPU what is free within `cuda_fraction` of it
    (TGI's --cuda-memory-fraction); on the CPU the machine's available memory, or less where a
    container's cgroup limit leaves less (a pod limited to 8 GiB on a 512 GiB node)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allowed = cuda_fraction * total - torch.cuda.memory_reserved(device)
        return max(int(min(free, allowed)), 0)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_free_bytes()
    return available if room is None else min(available, room)


def cgroup_free_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's memory limit minus its usage (cgroup v2, else v1); None without a limit."""
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),
    ):
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def profile_batch(
    prompt_lens: list[int], params: list[SamplingParams], block_size: int, vocab_size: int
) -> Batch:
    """Requests of the given lengths with sequential blocks from 1 (block 0 stays reserved)."""
    requests, next_block = [], 1
    for i, (n, p) in enumerate(zip(prompt_lens, params)):
        num_blocks = (n + 1 + block_size - 1) // block_size
        blocks = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        ids = [(i * 7919 + k) % vocab_size for k in range(n)]
        requests.append(
            RequestState(
                id=i,
                token_ids=ids,
                num_prompt_tokens=n,
                blocks=blocks,
                slots=[],
                cache_len=0,
                scheduled=n,
                sampler=RequestSampler(p),
                max_new_tokens=2,
                ignore_eos=True,
                prefill_logprobs=True,
                top_n_tokens=5,
                block_size=block_size,
            )
        )
    return Batch(0, requests, block_size)


def run_warmup(
    generator: Generator,
    prompt_lens: list[int],
    params: list[SamplingParams],
    budget: MemoryBudget,
    max_input: int | None,
    max_total: int | None,
    cuda_fraction: float = 1.0,
    cuda_graphs: Sequence[int] = (),
    max_batch_total: int | None = None,
) -> WarmupResult:
    runner = generator.runner
    bs = runner.block_size
    if budget.sized_to_need and runner.device.type == "cpu":
        # The cache is sized by tokens, not by what a profile leaves free: a short prefill
        # runs every code path once, where the longest would take minutes on a large model.
        prompt_lens, params = [min(n, PROFILE_TOKENS) for n in prompt_lens[:1]], params[:1]
    blocks_needed = 1 + sum((n + 1 + bs - 1) // bs for n in prompt_lens)
    runner.allocate_cache(blocks_needed)
    batch = profile_batch(prompt_lens, params, bs, runner.config.vocab_size)
    generator.step(batch)  # the prefill: peak activation memory
    generator.step(batch)  # one decode step
    del batch
    runner.allocate_cache(1)
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()  # the profile's activations go back to the device
    free = free_memory_bytes(runner.device, cuda_fraction)
    cache_bytes = budget.resolve(free)
    if budget.sized_to_need:
        need = max_batch_total or max(DEFAULT_KV_TOKENS, 2 * (max_total or 0))
        cache_bytes = min(cache_bytes, (1 + -(-need // bs)) * runner.bytes_per_block())
    num_blocks = max(cache_bytes // runner.bytes_per_block(), 2)
    num_blocks = min(num_blocks, (2**32 - 1) // bs)
    runner.allocate_cache(num_blocks)
    total = num_blocks * bs
    log.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB, %.0f%% of %.2f GiB free)",
        num_blocks,
        bs,
        num_blocks * runner.bytes_per_block() / 2**30,
        100 * cache_bytes / max(free, 1),
        free / 2**30,
    )
    usable = total - bs  # block 0 is reserved: requests never get it
    max_total = max_total or min(runner.config.max_position_embeddings, usable)
    max_input = max_input or max_total - 1
    runner.capture_graphs(cuda_graphs, max_total)
    return WarmupResult(total, max_input, max_total)
