"""Loads the shard's C kernels for this CPU.

The kernels are compiled when the package is installed (shard/native_build.py, run by
setup.py), once per instruction-set variant, into shard/_kernels/. At start-up the best variant
this CPU runs is loaded, after checking that the libraries were built from these sources
(the manifest's digest) and that nobody else can have written them (owned by root or this
user, not writable by group or others, nor is their directory).

Where no installed variant fits (a checkout whose C sources changed since `make install`, an
install without a compiler), that is an error in the log, and the kernel is compiled at
start-up instead, with `-march=native`, into a private cache directory under the model cache;
without a compiler the callers' PyTorch fallbacks run. What happened to each kernel is in
`kernel_status()`, which /info reports. The libraries link the OpenMP runtime torch already
loaded (same soname), so they and torch share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
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
from shard.native_build import MANIFEST, library_name, sources_digest, variants

log = logging.getLogger(__name__)

CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]  # and -march=<march>
SIMD_HEADER = Path(__file__).with_name("simd.h")  # vector helpers the kernels #include
INSTALLED = Path(__file__).with_name("_kernels")  # what setup.py built (native_build.py)
_status: dict[str, str] = {}  # kernel name -> how it was loaded (kernel_status)


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


def unsafe_reason(path: Path) -> str | None:
    """Why `path` (a library, or the directory it is in) may have been written by someone
    other than root or this user, or None."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid not in (0, os.getuid()):
            return f"{p} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not (p.is_dir() and st.st_mode & 0o1000):
            return f"{p} is writable by its group or others (mode {st.st_mode & 0o777:o})"
    return None


def installed_library(source: Path, installed: Path | None = None) -> tuple[Path | None, str]:
    """The installed library of `source` for this CPU (in `installed`, default INSTALLED) and
    the variant's name, or None and why none can be loaded."""
    installed = installed or INSTALLED
    try:
        manifest = json.loads((installed / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, f"no kernels were built at install ({installed / MANIFEST} is missing)"
    if manifest.get("sources") != sources_digest():
        return None, "the installed kernels were built from other sources (reinstall the package)"
    flags = cpu_flags()
    for variant in variants():
        if variant.needs <= flags:
            path = installed / library_name(source.name, variant.name)
            if not path.exists():
                return None, f"{path.name} is missing from {installed}"
            unsafe = unsafe_reason(path)
            return (None, f"refused: {unsafe}") if unsafe else (path, variant.name)
    return None, "no installed variant runs on this CPU"


def private_cache_dir() -> Path:
    """Where kernels compiled at start-up go: this user's own directory (mode 0700)."""
    directory = default_cache_dir() / "kernels" / f"uid-{os.getuid()}"
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def library_path(source: Path, includes: tuple[Path, ...] = ()) -> Path:
    """The library of `source` to load: the installed variant, else compiled at start-up (an
    error in the log: the installed ones should have fitted)."""
    if custom_kernels_disabled():
        raise RuntimeError("custom kernels are disabled (DISABLE_CUSTOM_KERNELS)")
    path, how = installed_library(source)
    if path is not None:
        _status[source.stem] = f"installed {how}"
        return path
    log.error("%s: %s; compiling it at start-up", source.name, how)
    path = build_library(private_cache_dir(), source, includes)
    _status[source.stem] = f"compiled at start-up ({how})"
    return path


@functools.cache
def load_library(
    source: Path, includes: tuple[Path, ...] = (), fallback: str = ""
) -> ctypes.CDLL | None:
    """`source`'s library for this CPU (library_path), loaded once per process; None, with an
    error saying what runs instead (`fallback`), where there is none."""
    try:
        return ctypes.CDLL(str(library_path(source, includes)))
    except (OSError, RuntimeError) as err:
        log.error("%s unavailable, %s: %s", source.name, fallback, err)
        mark_unavailable(source, f"{fallback}: {err}")
        return None


def mark_unavailable(source: Path, what_runs: str) -> None:
    _status[source.stem] = f"unavailable, {what_runs}"


def kernel_status() -> str:
    """How the kernels loaded so far were found: `installed avx512vnni` where all of them are
    installed ones of one variant, else each kernel's own line."""
    states = set(_status.values())
    if len(states) == 1:
        return states.pop()
    return "; ".join(f"{name}: {state}" for name, state in sorted(_status.items()))


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
