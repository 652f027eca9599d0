"""What the CPU can compute natively, read from /proc/cpuinfo when asked (never at import)."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of the first CPU; empty where /proc/cpuinfo is not there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    """bfloat16 matrix products run in hardware (AVX512-BF16 or AMX), not emulated."""
    return bool(BF16_FLAGS & flags)
