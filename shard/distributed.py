"""The tensor-parallel group of this shard: rank, world size and the collectives the
parallel layers use. With world_size 1 every collective is a no-op."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shard.numerics import batch_invariant


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x. In batch-invariant mode the parts are gathered and added
        in rank order: gloo's ring all-reduce adds them in an order that depends on where an
        element falls among chunks of the tensor, so on its number of rows."""
        if self.world_size == 1:
            return x
        if not batch_invariant():
            dist.all_reduce(x, group=self.group)
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        total = parts[0]
        for part in parts[1:]:
            total = total + part  # rank order, every rank alike
        return total

    def close(self) -> None:
        """Leaves the group; a process that exits with gloo threads still running aborts."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., n * world_size], rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = Dist()


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    timeout_s: float = 120.0,
) -> Dist:
    """Joins the tensor-parallel group (gloo on the CPU, NCCL on CUDA). A collective that
    waits longer than `timeout_s` (a rank died or hangs) raises instead of blocking forever."""
    if world_size == 1:
        return SINGLE
    from datetime import timedelta

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return Dist(rank, world_size, dist.group.WORLD)


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, world_size: int) -> None:
    """Fails at startup with a clear message when the model cannot be split `world_size` ways."""
    problems = []
    if num_heads % world_size:
        problems.append(f"num_attention_heads ({num_heads})")
    if num_kv_heads >= world_size and num_kv_heads % world_size:
        problems.append(f"num_key_value_heads ({num_kv_heads})")
    if num_kv_heads < world_size and world_size % num_kv_heads:
        problems.append(f"num_key_value_heads ({num_kv_heads}, replicated)")
    if intermediate % world_size:
        problems.append(f"intermediate_size ({intermediate})")
    if problems:
        raise ValueError(
            f"the model cannot be split over {world_size} shards: {', '.join(problems)} "
            f"must divide evenly by {world_size}; choose another --num-shard"
        )
