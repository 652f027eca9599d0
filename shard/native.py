"""Compiles the shard's C kernels for this CPU: with the system's C compiler (`$CC`, else gcc)
and `-march=native`, so AVX-512, AVX2 or plain code is chosen where it runs, into a shared
library cached under the model cache (keyed by the sources, the flags, the compiler and the
CPU) so later starts load it at once. The libraries link the OpenMP runtime torch already
loaded (same soname), so they and torch share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from common.cpu import cpu_flags
from shard.config import default_cache_dir

log = logging.getLogger(__name__)

CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]  # and -march=<march>
SIMD_HEADER = Path(__file__).with_name("simd.h")  # vector helpers the kernels #include


def custom_kernels_disabled() -> bool:
    """DISABLE_CUSTOM_KERNELS (TGI's variable, set by `launcher --disable-custom-kernels`): every
    kernel falls back to its PyTorch reference. Read when a kernel is built, never at import."""
    return os.environ.get("DISABLE_CUSTOM_KERNELS", "").strip().lower() in ("1", "true", "yes")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _library_key(compiler: str, sources: list[Path], flags: list[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    cpu = platform.machine() + " " + " ".join(sorted(cpu_flags()))
    texts = [s.read_text() for s in sources]
    raw = "\n".join([*texts, " ".join(flags), version, cpu, torch.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_library(
    cache_dir: Path, source: Path, includes: tuple[Path, ...] = (), march: str = "native"
) -> Path:
    """The compiled library of `source` for this CPU, compiled once into cache_dir. `includes`
    are the files `source` #includes: a change to them builds a new library too. `march` other
    than native builds the code paths of an older instruction set (the tests run them all)."""
    if custom_kernels_disabled():
        raise RuntimeError("custom kernels are disabled (DISABLE_CUSTOM_KERNELS)")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    flags = [*CFLAGS, f"-march={march}"]
    target = cache_dir / f"{source.stem}-{_library_key(compiler, [source, *includes], flags)}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600: other users sharing the cache could not load it
        os.replace(tmp, target)  # atomic: concurrent shards never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load_library(
    source: Path, includes: tuple[Path, ...] = (), fallback: str = ""
) -> ctypes.CDLL | None:
    """`source` built for this CPU (under the model cache) and loaded, once per process; None,
    with a warning saying what runs instead (`fallback`), where it cannot be built."""
    try:
        return ctypes.CDLL(str(build_library(default_cache_dir() / "kernels", source, includes)))
    except (OSError, RuntimeError) as err:
        log.warning("%s unavailable, %s: %s", source.name, fallback, err)
        return None


def kernel_build(device: torch.device) -> str:
    """What a request's numbers depend on besides the model and its settings: on the CPU our
    kernels' sources, the compiler and the CPU's instruction sets (each picks code paths),
    torch's version; on a GPU torch's and CUDA's versions and the device. A short hash, which
    the router folds into OpenAI's `system_fingerprint`."""
    if device.type == "cuda":
        parts = [torch.__version__, str(torch.version.cuda), torch.cuda.get_device_name(device)]
    else:
        sources = sorted(Path(__file__).parent.rglob("*.[ch]"))
        compiler = _compiler()
        version = (
            subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
            if compiler
            else "no compiler"
        )
        parts = [s.read_text() for s in sources]
        parts += [version, platform.machine(), " ".join(sorted(cpu_flags())), torch.__version__]
        parts.append(str(custom_kernels_disabled()))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
