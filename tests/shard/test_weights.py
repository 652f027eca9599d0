"""Checkpoint reading: safetensors only (pickle refused), sharded index files, dtypes, and the
KV cache memory flag."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from shard.checkpoint.weights import CheckpointError, Weights, list_safetensors
from shard.config import MemoryBudget
from shard.models import load_model
from tests.conftest import save_tiny_model


def test_pickle_only_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        list_safetensors(tmp_path)


def test_sharded_index_is_followed(tmp_path):
    save_file({"a": torch.arange(4.0)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2, 6)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = Weights(tmp_path, torch.bfloat16)
    assert weights.get("a").dtype == torch.bfloat16
    assert weights.get("a").tolist() == [0, 1, 2, 3]
    assert weights.get("b").shape == (2, 6)


def test_sharded_reads_give_each_rank_its_slice(tmp_path):
    from shard.distributed import Dist

    save_file({"w": torch.arange(12.0).reshape(3, 4)}, tmp_path / "model.safetensors")
    parts = [
        Weights(tmp_path, torch.float32, dist=Dist(rank=r, world_size=2)).get_sharded("w", 1)
        for r in range(2)
    ]
    assert torch.equal(torch.cat(parts, dim=1), torch.arange(12.0).reshape(3, 4))
    with pytest.raises(CheckpointError, match="cannot be split"):
        Weights(tmp_path, torch.float32, dist=Dist(rank=0, world_size=2)).get_sharded("w", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_loads_in_every_dtype(tmp_path, dtype):
    model = load_model(save_tiny_model(tmp_path / "m"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FooForCausalLM"], "foo"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FooForCausalLM: model type 'foo' is unknown to"):
        load_model(path, torch.float32)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.3", MemoryBudget(fraction=0.3)),
        ("1", MemoryBudget(fraction=1.0)),
        ("2GiB", MemoryBudget(bytes=2 * 2**30)),
        ("500MB", MemoryBudget(bytes=500 * 10**6)),
        ("123456789", MemoryBudget(bytes=123456789)),
    ],
)
def test_memory_budget_parsing(text, expected):
    assert MemoryBudget.parse(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "0", "lots", "3 parsecs"])
def test_memory_budget_rejects_nonsense(text):
    with pytest.raises(ValueError):
        MemoryBudget.parse(text)
