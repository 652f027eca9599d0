"""The KV cache's share of free memory respects a container's cgroup limit: a pod limited to
a few GiB on a large node must not size its cache from the node's memory and be OOM-killed."""

from __future__ import annotations

import torch

from shard.engine import warmup
from shard.engine.warmup import cgroup_free_bytes


def test_cgroup_v2_limit_minus_usage(tmp_path) -> None:
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert cgroup_free_bytes(tmp_path) == 7 * 2**30


def test_cgroup_v2_without_a_limit(tmp_path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert cgroup_free_bytes(tmp_path) is None


def test_cgroup_v1(tmp_path) -> None:
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(4 * 2**30))
    (v1 / "memory.usage_in_bytes").write_text(str(5 * 2**30))
    assert cgroup_free_bytes(tmp_path) == 0  # over its limit: nothing left
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert cgroup_free_bytes(tmp_path) is None


def test_no_cgroup_files(tmp_path) -> None:
    assert cgroup_free_bytes(tmp_path) is None


def test_free_memory_is_the_smaller_of_the_machine_and_the_cgroup(monkeypatch) -> None:
    monkeypatch.setattr(warmup, "cgroup_free_bytes", lambda: 2**20)
    assert warmup.free_memory_bytes(torch.device("cpu")) == 2**20
    monkeypatch.setattr(warmup, "cgroup_free_bytes", lambda: None)
    assert warmup.free_memory_bytes(torch.device("cpu")) > 2**20
