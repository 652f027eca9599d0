"""CUDA graphs for decode steps, as TGI's `--cuda-graphs`: one graph per batch-size bucket
(default 1, 2, 4, 8, 16, 32), captured once the KV cache has its final size, replayed for a
decode step whose batch fits a bucket; other steps (prompts, larger batches) run eagerly.

A graph replays the kernels it recorded on the tensors it recorded, so each bucket owns static
inputs (ids, positions, slots, seq_lens, block_tables) and its logits. A step copies its values
into the smallest bucket that holds it; the rows past the step's are padding: token 0 at
position 0, writing its K/V to slot 0 of the reserved block 0, attending to that one slot.
What the model reads besides them (weights, KV cache, the rotary table) must not move after the
capture: the cache is final by then, and the rotary table is grown to every position first
(dynamic RoPE scaling, which rebuilds it, keeps decode eager).

Only the `triton` attention backend is captured: its decode step reads nothing but tensors.
(flash's builds its metadata from Python lists every step; SDPA plans on the host.)
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shard.engine.forward_context import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)  # TGI's default --cuda-graphs
GRAPH_BACKENDS = ("triton",)


def parse_cuda_graphs(text: str | None) -> tuple[int, ...]:
    """TGI's --cuda-graphs: a comma list of batch sizes; None: the default; "0": none."""
    if text is None or not text.strip():
        return DEFAULT_BUCKETS
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if any(size < 0 for size in sizes):
        raise ValueError(f"--cuda-graphs takes batch sizes >= 0, not {text!r}")
    return tuple(size for size in sizes if size > 0)


def bucket_for(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket (sorted ascending) that holds `size` rows, or None."""
    i = bisect.bisect_left(buckets, size)
    return buckets[i] if i < len(buckets) else None


@dataclass
class StaticBatch:
    """The inputs and output a graph recorded, for `size` rows."""

    input_ids: torch.Tensor  # [size] int64
    positions: torch.Tensor  # [size] int64
    slots: torch.Tensor  # [size] int64
    seq_lens: torch.Tensor  # [size] int32
    block_tables: torch.Tensor  # [size, max_blocks] int32
    query_start_loc: torch.Tensor  # [size + 1] int32: 0, 1, ..., size (one token each)
    block_size: int
    logits: torch.Tensor | None = None  # [size, V] float32, once captured

    @classmethod
    def empty(
        cls, size: int, max_blocks: int, block_size: int, device: torch.device
    ) -> StaticBatch:
        long = dict(dtype=torch.int64, device=device)
        return cls(
            input_ids=torch.zeros(size, **long),
            positions=torch.zeros(size, **long),
            slots=torch.zeros(size, **long),
            seq_lens=torch.ones(size, dtype=torch.int32, device=device),
            block_tables=torch.zeros(size, max_blocks, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            block_size=block_size,
        )

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def metadata(self) -> AttentionMetadata:
        """The decode step these tensors describe, for the capture (the lists only tell the
        backends it is a decode step; the graph never reads them again)."""
        return AttentionMetadata(
            slots=self.slots,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            query_lens_list=[1] * self.size,
            seq_lens_list=[1] * self.size,
            block_size=self.block_size,
        )

    def load(self, input_ids: list[int], positions: list[int], meta: AttentionMetadata) -> None:
        """Copies a step of n <= size rows in; rows past n become padding (block 0)."""
        n, width = len(input_ids), meta.block_tables.shape[1]
        device = self.input_ids.device
        pad = self.size - n
        self.input_ids.copy_(torch.tensor(input_ids + [0] * pad, device=device))
        self.positions.copy_(torch.tensor(positions + [0] * pad, device=device))
        self.slots[:n].copy_(meta.slots)
        self.slots[n:].zero_()
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:].fill_(1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.block_tables[n:].zero_()


class CudaGraph:
    """One torch.cuda.CUDAGraph: warmed up on a side stream, then captured (PyTorch's recipe)."""

    def __init__(self, pool) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    """The captured buckets of one model runner.

    `forward(static)` runs the model on a StaticBatch and returns its logits [size, V];
    `new_graph()` gives an object with `capture(fn) -> out` and `replay()` (CudaGraph on a
    GPU, a fake in the tests)."""

    def __init__(
        self,
        buckets: Sequence[int],
        max_blocks: int,
        block_size: int,
        device: torch.device,
        forward: Callable[[StaticBatch], torch.Tensor],
        new_graph: Callable[[], object] | None = None,
    ):
        self.buckets = tuple(sorted(buckets))
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.device = device
        self.forward = forward
        self.new_graph = new_graph or self._cuda_graph_factory()
        self.graphs: dict[int, tuple[object, StaticBatch]] = {}
        self.replays = 0  # decode steps served by a graph (logged, and read by tests)

    @staticmethod
    def _cuda_graph_factory() -> Callable[[], CudaGraph]:
        pool = torch.cuda.graph_pool_handle()  # every bucket shares one memory pool
        return lambda: CudaGraph(pool)

    def capture_all(self) -> None:
        """Largest bucket first, so the smaller ones reuse its pool's memory."""
        for size in sorted(self.buckets, reverse=True):
            static = StaticBatch.empty(size, self.max_blocks, self.block_size, self.device)
            graph = self.new_graph()
            static.logits = graph.capture(lambda s=static: self.forward(s))
            self.graphs[size] = (graph, static)
        log.info("captured CUDA graphs for decode batches of %s", ", ".join(map(str, self.buckets)))

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        meta: AttentionMetadata,
        logit_rows: list[int],
    ) -> torch.Tensor | None:
        """The step's logits [n, V] from a graph, or None where no graph fits the step."""
        n = len(input_ids)
        size = bucket_for(n, self.buckets)
        fits = (
            size is not None
            and meta.is_decode_only
            and len(logit_rows) == n
            and meta.block_tables.shape[1] <= self.max_blocks
        )
        if not fits:
            return None
        graph, static = self.graphs[size]
        static.load(input_ids, positions, meta)
        graph.replay()
        self.replays += 1
        return static.logits[:n]
