"""CUDA-graph buckets with a fake graph, on the CPU: which bucket a step takes, that its values
reach the static tensors (padding rows on the reserved block 0), that a replay gives the eager
step's logits, and which steps stay eager. A real graph is captured in the device check."""

from __future__ import annotations

import pytest
import torch

from shard.engine.cuda_graphs import DecodeGraphs, StaticBatch, bucket_for, parse_cuda_graphs
from shard.engine.forward_context import AttentionMetadata

BLOCK = 4
VOCAB = 7


class FakeGraph:
    """Records the captured function and runs it again on replay, as a graph re-runs its
    kernels on the same tensors."""

    def __init__(self) -> None:
        self.fn = None
        self.replays = 0

    def capture(self, fn):
        self.fn = fn
        return fn()

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def fake_model(static: StaticBatch) -> torch.Tensor:
    """Logits that depend on every static input, written in place into one output tensor (as a
    graph's output is the same memory at every replay)."""
    if static.logits is None:
        static.logits = torch.zeros(static.size, VOCAB)
    row = (
        static.input_ids * 1000
        + static.positions * 100
        + static.slots * 10
        + static.seq_lens.long()
        + static.block_tables.long().sum(dim=1) * 7
    ).float()
    static.logits.copy_(row[:, None] + torch.arange(VOCAB))
    return static.logits


def decode_meta(seq_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    slots = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for n, t in zip(seq_lens, tables)]
    return AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, slots, BLOCK)


def graphs(buckets=(1, 2, 4, 8)) -> DecodeGraphs:
    made = []

    def new_graph():
        made.append(FakeGraph())
        return made[-1]

    g = DecodeGraphs(buckets, max_blocks=6, block_size=BLOCK, device="cpu", forward=fake_model,
                     new_graph=new_graph)  # fmt: skip
    g.capture_all()
    g.made = made
    return g


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, (1, 2, 4, 8, 16, 32)), ("", (1, 2, 4, 8, 16, 32)), ("0", ()), ("8, 2,4", (2, 4, 8))],
)
def test_parse_cuda_graphs_as_tgi(text, expected) -> None:
    assert parse_cuda_graphs(text) == expected


def test_bucket_is_the_smallest_that_holds_the_batch() -> None:
    buckets = (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 17, 32, 33)] == [
        1, 2, 4, 8, 8, 32, 32, None
    ]  # fmt: skip


def test_capture_is_largest_first_one_graph_per_bucket() -> None:
    g = graphs()
    assert sorted(g.graphs) == [1, 2, 4, 8] and len(g.made) == 4
    assert [s.size for _, s in (g.graphs[b] for b in (8, 4, 2, 1))] == [8, 4, 2, 1]


def test_a_replay_gives_the_eager_steps_logits_and_pads_on_block_0() -> None:
    g = graphs()
    seq_lens, tables = [5, 9, 2], [[3, 7], [1, 2, 6], [4]]
    meta = decode_meta(seq_lens, tables)
    ids, positions = [11, 22, 33], [n - 1 for n in seq_lens]
    logits = g.run(ids, positions, meta, [0, 1, 2])
    graph, static = g.graphs[4]
    assert graph.replays == 1 and g.replays == 1 and logits.shape == (3, VOCAB)
    eager = StaticBatch.empty(3, 6, BLOCK, "cpu")
    eager.load(ids, positions, meta)
    torch.testing.assert_close(logits, fake_model(eager))
    # the padding row: token 0 at position 0, slot 0 of block 0, seeing that one slot
    assert static.input_ids[3] == 0 and static.positions[3] == 0 and static.slots[3] == 0
    assert static.seq_lens[3] == 1 and not static.block_tables[3].any()
    assert static.block_tables[1, :3].tolist() == [1, 2, 6]


def test_a_smaller_step_after_a_larger_one_leaves_no_stale_rows() -> None:
    g = graphs()
    g.run([1, 2, 3, 4], [4, 4, 4, 4], decode_meta([5] * 4, [[1, 2]] * 4), [0, 1, 2, 3])
    g.run([9], [0], decode_meta([1], [[5]]), [0])
    g.run([7, 8], [1, 1], decode_meta([2, 2], [[3], [6]]), [0, 1])
    _, static = g.graphs[4]
    assert static.input_ids.tolist() == [1, 2, 3, 4]
    _, static = g.graphs[2]
    assert static.input_ids.tolist() == [7, 8] and static.seq_lens.tolist() == [2, 2]


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "tables", "logit_rows"),
    [
        ([1] * 9, [3] * 9, [[1]] * 9, list(range(9))),  # larger than every bucket
        ([2, 1], [2, 5], [[1], [2, 3]], [1, 2]),  # a prompt chunk: not a decode step
        ([1], [30], [[1, 2, 3, 4, 5, 6, 7, 8]], [0]),  # wider block table than captured
    ],
)
def test_steps_no_graph_fits_run_eagerly(query_lens, seq_lens, tables, logit_rows) -> None:
    g = graphs()
    slots = list(range(sum(query_lens)))
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, slots, BLOCK)
    ids = list(range(sum(query_lens)))
    assert g.run(ids, ids, meta, logit_rows) is None and g.replays == 0


def test_runner_captures_only_where_graphs_can_replay() -> None:
    """On the CPU (and for backends that plan on the host) decode stays eager, with a reason."""
    from shard.engine.model_runner import ModelRunner

    class Backend:
        name = "triton"

    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.backend = torch.device("cpu"), Backend()
    assert "cpu" in runner.graphs_unsupported((1, 2))
    assert "0" in runner.graphs_unsupported(())
    runner.device = torch.device("cuda", 0)
    runner.backend.name = "sdpa"
    assert "sdpa" in runner.graphs_unsupported((1, 2))
    runner.backend.name = "triton"
    runner.model = type("TransformersModel", (), {"implementation": "transformers"})()
    assert "transformers backend" in runner.graphs_unsupported((1, 2))
