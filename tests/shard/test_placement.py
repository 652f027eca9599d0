"""Where each rank runs and with what (shard/placement.py), for the machines it meets: the
decisions are pure functions of the rank, the GPU count, the checkpoint and the CPU flags, so
they are checked here on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.cpu import cpu_flags
from shard import attention
from shard.config import MemoryBudget, ShardConfig
from shard.placement import (
    default_block_size,
    default_dtype,
    default_kv_budget,
    resolve_device,
    resolve_placement,
)

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("requested", "rank", "gpus", "expected"),
    [
        ("auto", 0, 0, "cpu"),
        ("auto", 3, 0, "cpu"),
        ("auto", 0, 1, "cuda:0"),
        ("auto", 3, 4, "cuda:3"),
        ("auto", 5, 4, "cuda:1"),  # TGI: rank modulo the visible devices
        ("cuda", 2, 8, "cuda:2"),
        ("cuda:1", 0, 2, "cuda:1"),
        ("cpu", 1, 8, "cpu"),
    ],
)
def test_each_rank_gets_its_device(requested: str, rank: int, gpus: int, expected: str) -> None:
    assert str(resolve_device(requested, rank, gpus)) == expected


def test_cuda_without_gpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", 0, 0)


@pytest.mark.parametrize(
    ("device", "checkpoint", "flags", "expected"),
    [
        (GPU, "bfloat16", frozenset(), "bfloat16"),
        (GPU, "float16", frozenset(), "float16"),
        (GPU, "float32", frozenset(), "bfloat16"),  # a float32 checkpoint: half the bytes
        (GPU, None, frozenset(), "bfloat16"),
        (CPU, "bfloat16", frozenset({"avx2", "fma"}), "float32"),  # emulated bf16 is slower
        (CPU, "float16", frozenset({"avx512f", "avx512_bf16"}), "bfloat16"),
        (CPU, None, frozenset({"amx_bf16"}), "bfloat16"),
        (CPU, None, frozenset(), "float32"),
    ],
)
def test_default_dtype(device, checkpoint, flags, expected) -> None:
    assert default_dtype(device, checkpoint, flags) == expected


def test_block_size_and_kv_budget_per_backend_and_device() -> None:
    assert default_block_size("flash") == 256  # flash-attn 2's paged KV
    assert default_block_size("sdpa") == default_block_size("torch") == 16
    assert default_kv_budget(CPU) == MemoryBudget(fraction=0.3, sized_to_need=True)
    assert default_kv_budget(GPU) == MemoryBudget(fraction=0.9)


def test_a_cpu_machine_resolves_everything_to_the_cpu() -> None:
    config = resolve_placement(ShardConfig(model_dir="/m", model_id="m"), "bfloat16", 0)
    assert config.device == "cpu" and config.attention == "sdpa" and config.block_size == 16
    assert config.dtype == default_dtype(CPU, "bfloat16", cpu_flags())
    assert config.kv_cache_memory == MemoryBudget(fraction=0.3, sized_to_need=True)


def test_a_gpu_rank_takes_its_gpu_the_checkpoint_dtype_and_flash_blocks(monkeypatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    config = ShardConfig(model_dir="/m", model_id="m", rank=3, world_size=4)
    resolved = resolve_placement(config, "float16", cuda_count=4)
    assert resolved.device == "cuda:3" and resolved.dtype == "float16"
    assert resolved.attention == "flash" and resolved.block_size == 256
    assert resolved.kv_cache_memory == MemoryBudget(fraction=0.9)


def test_explicit_settings_are_kept(monkeypatch) -> None:
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    config = ShardConfig(
        model_dir="/m",
        model_id="m",
        device="cpu",
        dtype="float32",
        block_size=32,
        kv_cache_memory=MemoryBudget(bytes=2**30),
    )
    resolved = resolve_placement(config, "bfloat16", cuda_count=8)
    assert (resolved.device, resolved.dtype, resolved.block_size) == ("cpu", "float32", 32)
    assert resolved.kv_cache_memory == MemoryBudget(bytes=2**30)
    # a block size flash-attn cannot page: auto takes another backend on the GPU
    on_gpu = resolve_placement(ShardConfig(model_dir="/m", model_id="m", block_size=16), None, 1)
    assert on_gpu.attention != "flash" and on_gpu.block_size == 16


def test_cpu_flags_reads_the_first_cpu(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512_bf16\n\nflags : other\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_batch_invariance_is_on_for_the_cpu_and_asked_for_on_a_gpu() -> None:
    base = ShardConfig(model_dir="/m", model_id="m", block_size=16)
    assert resolve_placement(base, None, 0).batch_invariant is True
    assert resolve_placement(base, None, 1).batch_invariant is False
    off = ShardConfig(model_dir="/m", model_id="m", block_size=16, batch_invariant=False)
    assert resolve_placement(off, None, 0).batch_invariant is False


@pytest.mark.parametrize("text,expected", [("true", True), ("0", False), (None, None)])
def test_batch_invariant_switch(text, expected) -> None:
    from shard.config import parse_switch

    assert parse_switch("--batch-invariant", text) is expected
    with pytest.raises(ValueError, match="true or false"):
        parse_switch("--batch-invariant", "maybe")


def test_batch_invariance_on_a_gpu_takes_the_triton_backend() -> None:
    asked = ShardConfig(model_dir="/m", model_id="m", batch_invariant=True)
    resolved = resolve_placement(asked, "bfloat16", 1)
    assert resolved.batch_invariant and resolved.attention == "triton"
    assert resolved.block_size == 16


def test_a_kv_cache_dtype_of_its_own_on_the_cpu_only() -> None:
    """The CPU's paged kernel reads a 16-bit cache under float32 queries; the GPU backends
    attend over a cache of q's dtype, so another one there is refused at start-up."""
    config = ShardConfig(model_dir="/m", model_id="m", dtype="float32", kv_cache_dtype="float16")
    resolved = resolve_placement(config, None, 0)
    assert resolved.torch_dtype is torch.float32 and resolved.torch_kv_dtype is torch.float16
    assert resolve_placement(replace(config, kv_cache_dtype=None), None, 0).torch_kv_dtype is (
        torch.float32
    )
    with pytest.raises(ValueError, match="runs on the CPU only"):
        resolve_placement(config, None, 1)
    same = replace(config, dtype="float16")
    assert resolve_placement(same, None, 1).torch_kv_dtype is torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        ShardConfig(model_dir="/m", model_id="m", kv_cache_dtype="fp8")
