"""The shard's numeric mode, set once at start-up: batch-invariant or not.

Batch-invariant (`--batch-invariant`, the default on the CPU): a request's logits, and so its
tokens, logprobs and seeded draws, are the same bits whatever else is in its step, whatever
part of its prompt came from the prefix cache and however its prompt was chunked. Every
operation then has one numeric path for every number of rows, and every float reduction runs
in a fixed order per row:

- quantized products quantize each row of x on its own and sum its int8 dot products in one
  order whatever the tile (shard/quant/kernels.c); never the dense GEMM past a few rows;
- dense products run our own kernel (shard/layers/dense.c), not oneDNN, whose blocking and
  kernels change with the number of rows;
- attention is computed for each query token on its own, over the cached positions up to its
  own, in position order: a prompt token exactly as a decode token at the same position
  (shard/attention/paged_decode.c), never SDPA;
- on the CPU with quantized weights, the compiled decoder runs every step (prefill, mixed and
  decode, any batch size), so no step switches between it and the eager layers;
- tensor-parallel all-reduces sum the ranks' parts in rank order (shard/distributed.py).

Off (`--batch-invariant false`), steps take the fastest path for their size: the dense GEMM
on kept dense copies past a few rows, SDPA for prompts, the compiled decoder for decode steps
of a few sequences. This is a process-wide choice, like torch.use_deterministic_algorithms;
bootstrap sets it before the model loads, nothing reads it at import time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Numerics:
    batch_invariant: bool = True


_mode = Numerics()


def configure(batch_invariant: bool) -> None:
    global _mode
    _mode = Numerics(batch_invariant=batch_invariant)


def batch_invariant() -> bool:
    return _mode.batch_invariant
