"""What the launcher learns about the machine without importing torch: the GPUs nvidia-smi
lists, the compute type the router reports in `x-compute-type`, and TGI's `--env` report."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata

from common.cpu import cpu_flags

PACKAGES = ("textgen-server", "torch", "transformers", "tokenizers", "grpcio", "aiohttp")


def gpu_names() -> list[str] | None:
    """One name per GPU nvidia-smi lists; None without nvidia-smi (or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode:
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def nvidia_smi_count() -> int | None:
    names = gpu_names()
    return len(names) if names else None


def compute_type(num_shard: int, environ: Mapping[str, str]) -> str:
    """`x-compute-type`: COMPUTE_TYPE when set, else TGI's `{shards}-{device}` with the device
    where the shards run (today always the CPU), e.g. "1-cpu"."""
    return environ.get("COMPUTE_TYPE") or f"{num_shard}-cpu"


def runtime_env(environ: Mapping[str, str]) -> dict[str, str]:
    """TGI's `--env` report: versions, CPU and GPUs, and the variables that steer a launch."""
    report = {
        "Python": sys.version.split()[0],
        "Platform": platform.platform(),
        "CPU flags": " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
        or "none of avx2/avx512",
    }
    for package in PACKAGES:
        try:
            report[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            report[package] = "not installed"
    report["GPUs"] = ", ".join(gpu_names() or []) or "none found by nvidia-smi"
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HF_HOME", "COMPUTE_TYPE"):
        report[name] = environ.get(name, "unset")
    return report
