"""The shard process's configuration: one frozen dataclass, built from the CLI, validated once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


@dataclass(frozen=True)
class MemoryBudget:
    """KV cache budget: an absolute size, or a fraction of the memory free after warmup.
    `sized_to_need` (the CPU's default): what the token limits need (run_warmup:
    `--max-batch-total-tokens`, else DEFAULT_KV_TOKENS or two requests of --max-total-tokens),
    with the fraction only as a ceiling, as llama.cpp sizes its cache by its context."""

    bytes: int | None = None
    fraction: float | None = None
    sized_to_need: bool = False

    @classmethod
    def parse(cls, text: str) -> "MemoryBudget":
        """'0.3' -> 30 % of free memory; '4GiB', '500MB', '1000000' -> bytes."""
        value = text.strip().lower()
        try:
            number = float(value)
        except ValueError:
            match = re.fullmatch(r"([0-9.]+)\s*([a-z]*)", value)
            if not match or match.group(2) not in _SIZE_UNITS:
                raise ValueError(
                    f"invalid KV cache memory {text!r} (e.g. 0.3, 4GiB, 500MB)"
                ) from None
            return cls(bytes=int(float(match.group(1)) * _SIZE_UNITS[match.group(2)]))
        if 0 < number <= 1:
            return cls(fraction=number)
        if number > 1:
            return cls(bytes=int(number))
        raise ValueError(f"invalid KV cache memory {text!r}: must be > 0")

    def resolve(self, free_bytes: int) -> int:
        return self.bytes if self.bytes is not None else int(free_bytes * self.fraction)


def rope_override(scaling: str | None, factor: float | None) -> dict | None:
    """TGI's --rope-scaling/--rope-factor: a factor alone scales linearly, a type alone has
    factor 1; neither keeps the model's own rope_scaling (None)."""
    if scaling is None and factor is None:
        return None
    if scaling not in (None, "linear", "dynamic"):
        raise ValueError(f"rope scaling must be linear or dynamic, not {scaling!r}")
    if factor is not None and factor <= 0:
        raise ValueError(f"rope factor must be > 0, not {factor}")
    return {"rope_type": scaling or "linear", "factor": 1.0 if factor is None else factor}


def parse_switch(name: str, text: str | None) -> bool | None:
    """A true|false option's value; None when not given."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, not {text!r}")


@dataclass(frozen=True)
class ShardConfig:
    model_dir: str  # a resolved local Hugging Face directory
    model_id: str  # what the user asked for, for Info and logs
    uds_path: str = "/tmp/text-generation-server"
    rank: int = 0
    world_size: int = 1
    # None / "auto": decided at start-up for this rank and machine (shard/placement.py)
    dtype: str | None = None
    kv_cache_dtype: str | None = None  # of the stored K/V; None: the model's dtype
    quantize: str | None = None  # None: the checkpoint's own (GGUF blocks, GPTQ/AWQ) or dense
    device: str = "auto"  # cuda:{rank % GPUs} where CUDA is available, else cpu
    attention: str = "auto"
    block_size: int | None = None  # None: the attention backend's (16, flash-attn 256)
    # None: what the token limits need, at most 30% of free memory (CPU); 90% (GPU)
    kv_cache_memory: MemoryBudget | None = None
    cuda_memory_fraction: float = 1.0  # share of the GPU this process may use, as TGI
    cuda_graphs: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # decode batch sizes captured on a GPU
    batch_invariant: bool | None = None  # None: on for the CPU, off for a GPU (placement.py)
    model_impl: str = "auto"  # auto, native or transformers (shard/models/__init__.py)
    num_threads: int | None = None
    master_addr: str = "localhost"
    master_port: int = 29500
    collective_timeout: float = 120.0
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    use_prefix_caching: bool = False
    rope_scaling: dict | None = None  # overrides config.json's (launcher --rope-scaling/factor)
    otlp_endpoint: str | None = None  # traces go to this OTLP gRPC collector
    otlp_service_name: str = "text-generation-inference.server"

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(DTYPES)}, not {self.kv_cache_dtype!r}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ValueError("cuda_memory_fraction must be in (0, 1]")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The resolved dtype (shard/placement.py fills it in before the model loads)."""
        if self.dtype is None:
            raise ValueError("dtype is not resolved yet")
        return DTYPES[self.dtype]

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: --kv-cache-dtype, else the model's."""
        return DTYPES[self.kv_cache_dtype] if self.kv_cache_dtype else self.torch_dtype

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.rank}"

    def socket_url(self, rank: int) -> str:
        return f"unix://{self.uds_path}-{rank}"


def default_cache_dir() -> Path:
    """Where converted models and compiled kernels live: ``$TEXTGEN_CACHE`` if set, else
    ``~/.cache/textgen``."""
    env = os.environ.get("TEXTGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "textgen"
